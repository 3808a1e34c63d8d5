from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CalibrationPoint(_message.Message):
    __slots__ = ("density", "latency_ms", "memory_mb")
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    density: float
    latency_ms: float
    memory_mb: float
    def __init__(self, density: _Optional[float] = ..., latency_ms: _Optional[float] = ..., memory_mb: _Optional[float] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("latency_ms", "memory_mb", "battery")
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    BATTERY_FIELD_NUMBER: _ClassVar[int]
    latency_ms: float
    memory_mb: float
    battery: float
    def __init__(self, latency_ms: _Optional[float] = ..., memory_mb: _Optional[float] = ..., battery: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "profile", "flower_node_id", "calibration")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    FLOWER_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    profile: str
    flower_node_id: int
    calibration: _containers.RepeatedCompositeFieldContainer[CalibrationPoint]
    def __init__(self, name: _Optional[str] = ..., profile: _Optional[str] = ..., flower_node_id: _Optional[int] = ..., calibration: _Optional[_Iterable[_Union[CalibrationPoint, _Mapping]]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "density", "model_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    density: float
    model_version: str
    def __init__(self, device_id: _Optional[int] = ..., density: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id", "budget")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    budget: Budget
    def __init__(self, device_id: _Optional[int] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("density", "model_version", "changed")
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    density: float
    model_version: str
    changed: bool
    def __init__(self, density: _Optional[float] = ..., model_version: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("device_id", "density", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    density: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, device_id: _Optional[int] = ..., density: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportMetricsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("device_id", "density")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    density: float
    def __init__(self, device_id: _Optional[int] = ..., density: _Optional[float] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("data", "offset", "total_size", "sha256", "model_version", "density")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    sha256: str
    model_version: str
    density: float
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., model_version: _Optional[str] = ..., density: _Optional[float] = ...) -> None: ...
