from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_CODE_UNSET: _ClassVar[StatusCode]
    STATUS_CODE_OK: _ClassVar[StatusCode]
    STATUS_CODE_ERROR: _ClassVar[StatusCode]
STATUS_CODE_UNSET: StatusCode
STATUS_CODE_OK: StatusCode
STATUS_CODE_ERROR: StatusCode

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "alias", "registry_model_id", "artifact_digest", "role")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    alias: str
    registry_model_id: str
    artifact_digest: str
    role: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ..., registry_model_id: _Optional[str] = ..., artifact_digest: _Optional[str] = ..., role: _Optional[str] = ...) -> None: ...

class DeploymentRef(_message.Message):
    __slots__ = ("id", "service", "namespace", "pod", "node", "image_digest", "image_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    POD_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    service: str
    namespace: str
    pod: str
    node: str
    image_digest: str
    image_name: str
    def __init__(self, id: _Optional[str] = ..., service: _Optional[str] = ..., namespace: _Optional[str] = ..., pod: _Optional[str] = ..., node: _Optional[str] = ..., image_digest: _Optional[str] = ..., image_name: _Optional[str] = ...) -> None: ...

class OutputSummary(_message.Message):
    __slots__ = ("label", "score", "value")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    value: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ..., value: _Optional[float] = ...) -> None: ...

class PredictionEvent(_message.Message):
    __slots__ = ("prediction_id", "trace_id", "span_id", "timestamp_unix_nano", "duration_nanos", "model", "additional_models", "deployment", "endpoint", "protocol", "status", "status_code", "error_type", "input_fingerprint", "output", "features", "attributes", "sampled")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_NANO_FIELD_NUMBER: _ClassVar[int]
    DURATION_NANOS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_MODELS_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    trace_id: bytes
    span_id: bytes
    timestamp_unix_nano: int
    duration_nanos: int
    model: ModelRef
    additional_models: _containers.RepeatedCompositeFieldContainer[ModelRef]
    deployment: DeploymentRef
    endpoint: str
    protocol: str
    status: StatusCode
    status_code: str
    error_type: str
    input_fingerprint: bytes
    output: OutputSummary
    features: _containers.ScalarMap[str, float]
    attributes: _containers.ScalarMap[str, str]
    sampled: bool
    def __init__(self, prediction_id: _Optional[str] = ..., trace_id: _Optional[bytes] = ..., span_id: _Optional[bytes] = ..., timestamp_unix_nano: _Optional[int] = ..., duration_nanos: _Optional[int] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., additional_models: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ..., deployment: _Optional[_Union[DeploymentRef, _Mapping]] = ..., endpoint: _Optional[str] = ..., protocol: _Optional[str] = ..., status: _Optional[_Union[StatusCode, str]] = ..., status_code: _Optional[str] = ..., error_type: _Optional[str] = ..., input_fingerprint: _Optional[bytes] = ..., output: _Optional[_Union[OutputSummary, _Mapping]] = ..., features: _Optional[_Mapping[str, float]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., sampled: _Optional[bool] = ...) -> None: ...
