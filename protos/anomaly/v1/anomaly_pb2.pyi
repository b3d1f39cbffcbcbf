from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PixelType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_TYPE_UNSPECIFIED: _ClassVar[PixelType]
    PIXEL_TYPE_UINT8: _ClassVar[PixelType]
    PIXEL_TYPE_UINT16: _ClassVar[PixelType]
PIXEL_TYPE_UNSPECIFIED: PixelType
PIXEL_TYPE_UINT8: PixelType
PIXEL_TYPE_UINT16: PixelType

class RawImage(_message.Message):
    __slots__ = ("data", "width", "height", "channels", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    width: int
    height: int
    channels: int
    dtype: PixelType
    def __init__(self, data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ..., dtype: _Optional[_Union[PixelType, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("encoded", "raw", "model", "alias", "version", "category", "return_anomaly_map", "request_id", "station", "return_overlay")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    RETURN_ANOMALY_MAP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATION_FIELD_NUMBER: _ClassVar[int]
    RETURN_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawImage
    model: str
    alias: str
    version: int
    category: str
    return_anomaly_map: bool
    request_id: str
    station: str
    return_overlay: bool
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawImage, _Mapping]] = ..., model: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ..., category: _Optional[str] = ..., return_anomaly_map: _Optional[bool] = ..., request_id: _Optional[str] = ..., station: _Optional[str] = ..., return_overlay: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("decode_ms", "queue_ms", "inference_ms", "total_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    queue_ms: float
    inference_ms: float
    total_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "score", "normalized_score", "is_anomalous", "threshold", "category", "anomaly_map_png", "model", "timings", "threshold_source", "overlay_png")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    IS_ANOMALOUS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    ANOMALY_MAP_PNG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    category: str
    anomaly_map_png: bytes
    model: ModelRef
    timings: Timings
    threshold_source: str
    overlay_png: bytes
    def __init__(self, request_id: _Optional[str] = ..., score: _Optional[float] = ..., normalized_score: _Optional[float] = ..., is_anomalous: _Optional[bool] = ..., threshold: _Optional[float] = ..., category: _Optional[str] = ..., anomaly_map_png: _Optional[bytes] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., threshold_source: _Optional[str] = ..., overlay_png: _Optional[bytes] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "alias", "architecture", "variant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VARIANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    alias: str
    architecture: str
    variant: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., alias: _Optional[str] = ..., architecture: _Optional[str] = ..., variant: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model", "alias", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    alias: str
    version: int
    def __init__(self, model: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("ref", "input_height", "input_width", "categories", "thresholds", "provider", "precision", "loaded_at", "source_uri", "last_error", "last_error_version", "state", "max_image_bytes", "threshold_sources", "tiling")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class ThresholdSourcesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REF_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SOURCES_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    ref: ModelRef
    input_height: int
    input_width: int
    categories: _containers.RepeatedScalarFieldContainer[str]
    thresholds: _containers.ScalarMap[str, float]
    provider: str
    precision: str
    loaded_at: str
    source_uri: str
    last_error: str
    last_error_version: str
    state: str
    max_image_bytes: int
    threshold_sources: _containers.ScalarMap[str, str]
    tiling: Tiling
    def __init__(self, ref: _Optional[_Union[ModelRef, _Mapping]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., categories: _Optional[_Iterable[str]] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., provider: _Optional[str] = ..., precision: _Optional[str] = ..., loaded_at: _Optional[str] = ..., source_uri: _Optional[str] = ..., last_error: _Optional[str] = ..., last_error_version: _Optional[str] = ..., state: _Optional[str] = ..., max_image_bytes: _Optional[int] = ..., threshold_sources: _Optional[_Mapping[str, str]] = ..., tiling: _Optional[_Union[Tiling, _Mapping]] = ...) -> None: ...

class Tiling(_message.Message):
    __slots__ = ("image_height", "image_width", "stride")
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    image_height: int
    image_width: int
    stride: int
    def __init__(self, image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., stride: _Optional[int] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "verdict", "defect_type", "operator", "comment", "station")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DEFECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    STATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    verdict: str
    defect_type: str
    operator: str
    comment: str
    station: str
    def __init__(self, request_id: _Optional[str] = ..., verdict: _Optional[str] = ..., defect_type: _Optional[str] = ..., operator: _Optional[str] = ..., comment: _Optional[str] = ..., station: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("request_id", "recorded_at")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    recorded_at: str
    def __init__(self, request_id: _Optional[str] = ..., recorded_at: _Optional[str] = ...) -> None: ...

class ListReviewsRequest(_message.Message):
    __slots__ = ("station", "category", "model_version", "since", "until", "limit", "include_reviewed")
    STATION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REVIEWED_FIELD_NUMBER: _ClassVar[int]
    station: str
    category: str
    model_version: str
    since: str
    until: str
    limit: int
    include_reviewed: bool
    def __init__(self, station: _Optional[str] = ..., category: _Optional[str] = ..., model_version: _Optional[str] = ..., since: _Optional[str] = ..., until: _Optional[str] = ..., limit: _Optional[int] = ..., include_reviewed: _Optional[bool] = ...) -> None: ...

class ReviewItem(_message.Message):
    __slots__ = ("record_id", "request_id", "created_at", "station", "category", "model_name", "model_version", "score", "normalized_score", "threshold", "threshold_source", "decision", "reason", "verdict", "defect_type", "reviewer", "has_evidence", "latency_ms")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DEFECT_TYPE_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    HAS_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    request_id: str
    created_at: str
    station: str
    category: str
    model_name: str
    model_version: str
    score: float
    normalized_score: float
    threshold: float
    threshold_source: str
    decision: str
    reason: str
    verdict: str
    defect_type: str
    reviewer: str
    has_evidence: bool
    latency_ms: float
    def __init__(self, record_id: _Optional[str] = ..., request_id: _Optional[str] = ..., created_at: _Optional[str] = ..., station: _Optional[str] = ..., category: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., score: _Optional[float] = ..., normalized_score: _Optional[float] = ..., threshold: _Optional[float] = ..., threshold_source: _Optional[str] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ..., verdict: _Optional[str] = ..., defect_type: _Optional[str] = ..., reviewer: _Optional[str] = ..., has_evidence: _Optional[bool] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class ListReviewsResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ReviewItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ReviewItem, _Mapping]]] = ...) -> None: ...

class GetEvidenceRequest(_message.Message):
    __slots__ = ("record_id", "drawings")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    DRAWINGS_FIELD_NUMBER: _ClassVar[int]
    record_id: str
    drawings: str
    def __init__(self, record_id: _Optional[str] = ..., drawings: _Optional[str] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("item", "image", "image_type", "heat_png", "overlay_png")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    HEAT_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    item: ReviewItem
    image: bytes
    image_type: str
    heat_png: bytes
    overlay_png: bytes
    def __init__(self, item: _Optional[_Union[ReviewItem, _Mapping]] = ..., image: _Optional[bytes] = ..., image_type: _Optional[str] = ..., heat_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ...) -> None: ...

class GetQualityRequest(_message.Message):
    __slots__ = ("days", "station")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    STATION_FIELD_NUMBER: _ClassVar[int]
    days: int
    station: str
    def __init__(self, days: _Optional[int] = ..., station: _Optional[str] = ...) -> None: ...

class QualityDay(_message.Message):
    __slots__ = ("day", "model_name", "model_version", "category", "decided", "reviewed", "false_calls", "escapes")
    DAY_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_FIELD_NUMBER: _ClassVar[int]
    REVIEWED_FIELD_NUMBER: _ClassVar[int]
    FALSE_CALLS_FIELD_NUMBER: _ClassVar[int]
    ESCAPES_FIELD_NUMBER: _ClassVar[int]
    day: str
    model_name: str
    model_version: str
    category: str
    decided: int
    reviewed: int
    false_calls: int
    escapes: int
    def __init__(self, day: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., category: _Optional[str] = ..., decided: _Optional[int] = ..., reviewed: _Optional[int] = ..., false_calls: _Optional[int] = ..., escapes: _Optional[int] = ...) -> None: ...

class ThresholdProposal(_message.Message):
    __slots__ = ("model_name", "model_version", "category", "tag", "current", "has_threshold", "threshold", "confirmed_defects", "confirmed_good", "false_calls_now", "escapes_now", "false_calls_proposed", "note")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    HAS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_DEFECTS_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_GOOD_FIELD_NUMBER: _ClassVar[int]
    FALSE_CALLS_NOW_FIELD_NUMBER: _ClassVar[int]
    ESCAPES_NOW_FIELD_NUMBER: _ClassVar[int]
    FALSE_CALLS_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    category: str
    tag: str
    current: float
    has_threshold: bool
    threshold: float
    confirmed_defects: int
    confirmed_good: int
    false_calls_now: int
    escapes_now: int
    false_calls_proposed: int
    note: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., category: _Optional[str] = ..., tag: _Optional[str] = ..., current: _Optional[float] = ..., has_threshold: _Optional[bool] = ..., threshold: _Optional[float] = ..., confirmed_defects: _Optional[int] = ..., confirmed_good: _Optional[int] = ..., false_calls_now: _Optional[int] = ..., escapes_now: _Optional[int] = ..., false_calls_proposed: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class QualityReport(_message.Message):
    __slots__ = ("days", "proposals", "since", "until")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    PROPOSALS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    days: _containers.RepeatedCompositeFieldContainer[QualityDay]
    proposals: _containers.RepeatedCompositeFieldContainer[ThresholdProposal]
    since: str
    until: str
    def __init__(self, days: _Optional[_Iterable[_Union[QualityDay, _Mapping]]] = ..., proposals: _Optional[_Iterable[_Union[ThresholdProposal, _Mapping]]] = ..., since: _Optional[str] = ..., until: _Optional[str] = ...) -> None: ...

class GetPromotionRequest(_message.Message):
    __slots__ = ("days",)
    DAYS_FIELD_NUMBER: _ClassVar[int]
    days: int
    def __init__(self, days: _Optional[int] = ...) -> None: ...

class AliasServing(_message.Message):
    __slots__ = ("model_name", "alias", "role", "version", "since", "last_error", "last_error_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    alias: str
    role: str
    version: str
    since: str
    last_error: str
    last_error_version: str
    def __init__(self, model_name: _Optional[str] = ..., alias: _Optional[str] = ..., role: _Optional[str] = ..., version: _Optional[str] = ..., since: _Optional[str] = ..., last_error: _Optional[str] = ..., last_error_version: _Optional[str] = ...) -> None: ...

class DecidingPart(_message.Message):
    __slots__ = ("label", "category", "expect", "got", "why", "thumbnail_jpeg")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    EXPECT_FIELD_NUMBER: _ClassVar[int]
    GOT_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    THUMBNAIL_JPEG_FIELD_NUMBER: _ClassVar[int]
    label: str
    category: str
    expect: str
    got: str
    why: str
    thumbnail_jpeg: bytes
    def __init__(self, label: _Optional[str] = ..., category: _Optional[str] = ..., expect: _Optional[str] = ..., got: _Optional[str] = ..., why: _Optional[str] = ..., thumbnail_jpeg: _Optional[bytes] = ...) -> None: ...

class GateVerdict(_message.Message):
    __slots__ = ("at", "model_name", "alias", "version", "against", "status", "reason", "known_parts", "parts", "origin")
    AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    AGAINST_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KNOWN_PARTS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    at: str
    model_name: str
    alias: str
    version: str
    against: str
    status: str
    reason: str
    known_parts: int
    parts: _containers.RepeatedCompositeFieldContainer[DecidingPart]
    origin: str
    def __init__(self, at: _Optional[str] = ..., model_name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[str] = ..., against: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., known_parts: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[DecidingPart, _Mapping]]] = ..., origin: _Optional[str] = ...) -> None: ...

class ShadowAgreement(_message.Message):
    __slots__ = ("served_version", "shadow_version", "category", "pairs", "agree", "ok_to_ng", "ng_to_ok", "ok_to_ng_count", "ng_to_ok_count")
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHADOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    AGREE_FIELD_NUMBER: _ClassVar[int]
    OK_TO_NG_FIELD_NUMBER: _ClassVar[int]
    NG_TO_OK_FIELD_NUMBER: _ClassVar[int]
    OK_TO_NG_COUNT_FIELD_NUMBER: _ClassVar[int]
    NG_TO_OK_COUNT_FIELD_NUMBER: _ClassVar[int]
    served_version: str
    shadow_version: str
    category: str
    pairs: int
    agree: int
    ok_to_ng: _containers.RepeatedScalarFieldContainer[str]
    ng_to_ok: _containers.RepeatedScalarFieldContainer[str]
    ok_to_ng_count: int
    ng_to_ok_count: int
    def __init__(self, served_version: _Optional[str] = ..., shadow_version: _Optional[str] = ..., category: _Optional[str] = ..., pairs: _Optional[int] = ..., agree: _Optional[int] = ..., ok_to_ng: _Optional[_Iterable[str]] = ..., ng_to_ok: _Optional[_Iterable[str]] = ..., ok_to_ng_count: _Optional[int] = ..., ng_to_ok_count: _Optional[int] = ...) -> None: ...

class Promotion(_message.Message):
    __slots__ = ("aliases", "verdicts", "shadow", "since", "notes")
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    aliases: _containers.RepeatedCompositeFieldContainer[AliasServing]
    verdicts: _containers.RepeatedCompositeFieldContainer[GateVerdict]
    shadow: _containers.RepeatedCompositeFieldContainer[ShadowAgreement]
    since: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, aliases: _Optional[_Iterable[_Union[AliasServing, _Mapping]]] = ..., verdicts: _Optional[_Iterable[_Union[GateVerdict, _Mapping]]] = ..., shadow: _Optional[_Iterable[_Union[ShadowAgreement, _Mapping]]] = ..., since: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...
