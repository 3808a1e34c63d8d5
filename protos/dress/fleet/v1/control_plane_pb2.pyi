from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CalibrationPoint(_message.Message):
    __slots__ = ("level", "latency_ms", "memory_mb", "train_ms", "train_memory_mb")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    level: int
    latency_ms: float
    memory_mb: float
    train_ms: float
    train_memory_mb: float
    def __init__(self, level: _Optional[int] = ..., latency_ms: _Optional[float] = ..., memory_mb: _Optional[float] = ..., train_ms: _Optional[float] = ..., train_memory_mb: _Optional[float] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("latency_ms", "memory_mb", "battery")
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    BATTERY_FIELD_NUMBER: _ClassVar[int]
    latency_ms: float
    memory_mb: float
    battery: float
    def __init__(self, latency_ms: _Optional[float] = ..., memory_mb: _Optional[float] = ..., battery: _Optional[float] = ...) -> None: ...

class Architecture(_message.Message):
    __slots__ = ("name", "densities", "width", "in_channels", "num_classes", "image_size", "bn_affine")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DENSITIES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BN_AFFINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    densities: _containers.RepeatedScalarFieldContainer[float]
    width: int
    in_channels: int
    num_classes: int
    image_size: int
    bn_affine: str
    def __init__(self, name: _Optional[str] = ..., densities: _Optional[_Iterable[float]] = ..., width: _Optional[int] = ..., in_channels: _Optional[int] = ..., num_classes: _Optional[int] = ..., image_size: _Optional[int] = ..., bn_affine: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("architecture", "model_version")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    architecture: Architecture
    model_version: str
    def __init__(self, architecture: _Optional[_Union[Architecture, _Mapping]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("name", "profile", "calibration", "supernode_public_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    SUPERNODE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    profile: str
    calibration: _containers.RepeatedCompositeFieldContainer[CalibrationPoint]
    supernode_public_key: str
    def __init__(self, name: _Optional[str] = ..., profile: _Optional[str] = ..., calibration: _Optional[_Iterable[_Union[CalibrationPoint, _Mapping]]] = ..., supernode_public_key: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("device_id", "level", "model_version", "architecture", "heartbeat_s", "credential", "name")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    device_id: int
    level: int
    model_version: str
    architecture: Architecture
    heartbeat_s: float
    credential: str
    name: str
    def __init__(self, device_id: _Optional[int] = ..., level: _Optional[int] = ..., model_version: _Optional[str] = ..., architecture: _Optional[_Union[Architecture, _Mapping]] = ..., heartbeat_s: _Optional[float] = ..., credential: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("budget", "served", "model_version", "checks")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKS_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    served: _containers.RepeatedCompositeFieldContainer[LevelUse]
    model_version: str
    checks: _containers.RepeatedCompositeFieldContainer[VersionCheck]
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ..., served: _Optional[_Iterable[_Union[LevelUse, _Mapping]]] = ..., model_version: _Optional[str] = ..., checks: _Optional[_Iterable[_Union[VersionCheck, _Mapping]]] = ...) -> None: ...

class VersionCheck(_message.Message):
    __slots__ = ("model_version", "level", "examples", "correct")
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    model_version: str
    level: int
    examples: int
    correct: int
    def __init__(self, model_version: _Optional[str] = ..., level: _Optional[int] = ..., examples: _Optional[int] = ..., correct: _Optional[int] = ...) -> None: ...

class LevelUse(_message.Message):
    __slots__ = ("level", "requests", "busy_ms", "confidence_sum")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_SUM_FIELD_NUMBER: _ClassVar[int]
    level: int
    requests: int
    busy_ms: float
    confidence_sum: float
    def __init__(self, level: _Optional[int] = ..., requests: _Optional[int] = ..., busy_ms: _Optional[float] = ..., confidence_sum: _Optional[float] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("level", "model_version", "changed", "heartbeat_s")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    level: int
    model_version: str
    changed: bool
    heartbeat_s: float
    def __init__(self, level: _Optional[int] = ..., model_version: _Optional[str] = ..., changed: _Optional[bool] = ..., heartbeat_s: _Optional[float] = ...) -> None: ...

class FetchModelRequest(_message.Message):
    __slots__ = ("level", "float16")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    FLOAT16_FIELD_NUMBER: _ClassVar[int]
    level: int
    float16: bool
    def __init__(self, level: _Optional[int] = ..., float16: _Optional[bool] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("data", "offset", "total_size", "sha256", "model_version", "level")
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    offset: int
    total_size: int
    sha256: str
    model_version: str
    level: int
    def __init__(self, data: _Optional[bytes] = ..., offset: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[str] = ..., model_version: _Optional[str] = ..., level: _Optional[int] = ...) -> None: ...
