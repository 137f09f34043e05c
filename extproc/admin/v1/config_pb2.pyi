from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("applied", "errors", "config_path", "config_sha256")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_SHA256_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    errors: _containers.RepeatedScalarFieldContainer[str]
    config_path: str
    config_sha256: str
    def __init__(self, applied: _Optional[bool] = ..., errors: _Optional[_Iterable[str]] = ..., config_path: _Optional[str] = ..., config_sha256: _Optional[str] = ...) -> None: ...
