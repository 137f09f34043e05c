from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("active_ext_proc_streams", "active_sse_streams", "sse_streams_total", "pid", "guard_verdicts")
    class GuardVerdictsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ACTIVE_EXT_PROC_STREAMS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SSE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    SSE_STREAMS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GUARD_VERDICTS_FIELD_NUMBER: _ClassVar[int]
    active_ext_proc_streams: int
    active_sse_streams: int
    sse_streams_total: int
    pid: int
    guard_verdicts: _containers.ScalarMap[str, int]
    def __init__(self, active_ext_proc_streams: _Optional[int] = ..., active_sse_streams: _Optional[int] = ..., sse_streams_total: _Optional[int] = ..., pid: _Optional[int] = ..., guard_verdicts: _Optional[_Mapping[str, int]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("team", "user", "organization")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    team: str
    user: str
    organization: str
    def __init__(self, team: _Optional[str] = ..., user: _Optional[str] = ..., organization: _Optional[str] = ...) -> None: ...

class LimitUsage(_message.Message):
    __slots__ = ("name", "metric", "window", "models", "limit", "used", "reserved", "remaining", "reset_in_seconds", "level")
    NAME_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESET_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    metric: str
    window: str
    models: _containers.RepeatedScalarFieldContainer[str]
    limit: int
    used: int
    reserved: int
    remaining: int
    reset_in_seconds: float
    level: str
    def __init__(self, name: _Optional[str] = ..., metric: _Optional[str] = ..., window: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., reserved: _Optional[int] = ..., remaining: _Optional[int] = ..., reset_in_seconds: _Optional[float] = ..., level: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("team", "limits", "user", "organization")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    ORGANIZATION_FIELD_NUMBER: _ClassVar[int]
    team: str
    limits: _containers.RepeatedCompositeFieldContainer[LimitUsage]
    user: str
    organization: str
    def __init__(self, team: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[LimitUsage, _Mapping]]] = ..., user: _Optional[str] = ..., organization: _Optional[str] = ...) -> None: ...

class ResetUsageRequest(_message.Message):
    __slots__ = ("team",)
    TEAM_FIELD_NUMBER: _ClassVar[int]
    team: str
    def __init__(self, team: _Optional[str] = ...) -> None: ...

class ResetUsageResponse(_message.Message):
    __slots__ = ("keys_removed",)
    KEYS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    keys_removed: int
    def __init__(self, keys_removed: _Optional[int] = ...) -> None: ...
