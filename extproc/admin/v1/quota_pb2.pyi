from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class GetUsageRequest(_message.Message):
    __slots__ = ("team",)
    TEAM_FIELD_NUMBER: _ClassVar[int]
    team: str
    def __init__(self, team: str | None = ...) -> None: ...

class LimitUsage(_message.Message):
    __slots__ = ("limit", "metric", "models", "name", "remaining", "reserved", "reset_in_seconds", "used", "window")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    metric: str
    window: str
    models: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    used: int
    reserved: int
    remaining: int
    reset_in_seconds: float
    def __init__(self, name: str | None = ..., metric: str | None = ..., window: str | None = ..., models: _Iterable[str] | None = ..., limit: int | None = ..., used: int | None = ..., reserved: int | None = ..., remaining: int | None = ..., reset_in_seconds: float | None = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("limits", "team")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    team: str
    limits: _containers.RepeatedCompositeFieldContainer[LimitUsage]
    def __init__(self, team: str | None = ..., limits: _Iterable[LimitUsage | _Mapping] | None = ...) -> None: ...

class ResetUsageRequest(_message.Message):
    __slots__ = ("team",)
    TEAM_FIELD_NUMBER: _ClassVar[int]
    team: str
    def __init__(self, team: str | None = ...) -> None: ...

class ResetUsageResponse(_message.Message):
    __slots__ = ("keys_removed",)
    KEYS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    keys_removed: int
    def __init__(self, keys_removed: int | None = ...) -> None: ...
