from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class PredictRequest(_message.Message):
    __slots__ = ("input", "shape", "deadline_ms")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    input: _containers.RepeatedScalarFieldContainer[float]
    shape: _containers.RepeatedScalarFieldContainer[int]
    deadline_ms: float
    def __init__(self, input: _Optional[_Iterable[float]] = ..., shape: _Optional[_Iterable[int]] = ..., deadline_ms: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("logits", "shape", "density", "latency_ms")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    logits: _containers.RepeatedScalarFieldContainer[float]
    shape: _containers.RepeatedScalarFieldContainer[int]
    density: float
    latency_ms: float
    def __init__(self, logits: _Optional[_Iterable[float]] = ..., shape: _Optional[_Iterable[int]] = ..., density: _Optional[float] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("name", "device_id", "profile", "density", "assigned_density", "model_version", "densities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_DENSITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DENSITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    device_id: int
    profile: str
    density: float
    assigned_density: float
    model_version: str
    densities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., device_id: _Optional[int] = ..., profile: _Optional[str] = ..., density: _Optional[float] = ..., assigned_density: _Optional[float] = ..., model_version: _Optional[str] = ..., densities: _Optional[_Iterable[float]] = ...) -> None: ...
