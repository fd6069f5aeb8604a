"""The model's shape, declared once (msgspec Structs).

Each request body the registry takes and each JSON body it answers with is a
Struct here. ``validation`` converts bodies into them (the library checks
types, lengths, patterns and enums; ``__post_init__`` adds the rules JSON
Schema cannot carry), ``render`` builds the answers from stored documents, and
``openapi`` publishes ``components.schemas`` from these same declarations.

Leaf types (``ObjectId``, ``ModelName``, ...) are ``Annotated`` aliases; the
names in ``NAMED`` also become components of their own, which the generated
schemas then reference.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, get_args

from msgspec import UNSET, Meta, Struct, UnsetType, defstruct

from . import urls, versions

# --------------------------------------------------------------------------- rules

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
NAME_RULE = "must be 1-100 characters of A-Z, a-z, 0-9, '_', '.' and '-', and not only dots"
VERSION_RULE = "must look like vMAJOR.MINOR, for example v1.0 or v2.3"
MAX_SHORT = 200
MAX_DESCRIPTION = 10_000
MAX_FORMAT = 50
MAX_TAGS = 100
MAX_TAG = 100
# Objects and lists inside user-supplied fields nest at most this deep: deeper
# documents break JSON encoders and BSON (MongoDB refuses 100 levels).
MAX_NESTING = 32
# BSON integers are signed 64-bit; a larger one (JSON allows it) cannot be
# stored by MongoDB, so it is refused on both backends alike.
INT64 = range(-(2**63), 2**63)

# The service refuses blank strings (Python's str.strip() leaves nothing).
# Python's \s covers every character str.strip() removes; ECMA-262's \s, which
# JSON Schema patterns use, lacks \x1c-\x1f and \x85, hence the explicit range.
NON_BLANK = r"[^\s\x1c-\x1f\x85]"

Status = Literal["active", "deprecated", "archived"]
STATUSES: tuple[str, ...] = get_args(Status)


def valid_name(name: str) -> bool:
    # "." and ".." are path segments to every URL normaliser on the way.
    return NAME_RE.fullmatch(name) is not None and name.strip(".") != ""


def check_json_value(value: Any, path: str, depth: int = 1) -> None:
    """A user-supplied JSON value MongoDB can store as data: keys neither
    ``$...`` (operators) nor dotted (paths), bounded nesting, 64-bit integers.

    Raises ValueError("<field>: <rule>"); ``__post_init__`` calls it, as JSON
    Schema cannot express these rules precisely (see SafeJsonObject).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
        raise ValueError(f"{path}: integers must be between -2**63 and 2**63-1 (64-bit); "
                         "send larger numbers as strings")
    if isinstance(value, (dict, list)) and depth > MAX_NESTING:
        raise ValueError(f"{path.split('.')[0].split('[')[0]}: must not nest objects or lists more than "
                         f"{MAX_NESTING} deep")
    if isinstance(value, dict):
        for k, v in value.items():
            if k.startswith("$") or "." in k:
                raise ValueError(f"{path}: key {k!r} must not start with '$' or contain '.'")
            if not k:
                raise ValueError(f"{path}: keys must not be empty")
            check_json_value(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_json_value(v, f"{path}[{i}]", depth + 1)


# --------------------------------------------------------------------------- leaf types


def Text(max_len: int, description: str | None = None) -> Any:
    """A non-blank string of at most ``max_len`` characters."""
    return Annotated[str, Meta(min_length=1, max_length=max_len, pattern=NON_BLANK, description=description)]


ShortText = Text(MAX_SHORT)
Description = Text(MAX_DESCRIPTION)
Format = Text(MAX_FORMAT, "the file format, for example pkl, onnx or joblib")
Algorithm = Text(MAX_SHORT, "free text, for example xgboost or random_forest")
ObjectId = Annotated[str, Meta(pattern="^[0-9a-f]{24}$", description="24 lowercase hex characters",
                               examples=["6b0916141a2ae0d99912e3ac"])]
# The pattern is what JSON Schema can say; __post_init__ also refuses names of only dots.
ModelName = Annotated[str, Meta(pattern=NAME_RE.pattern, description=NAME_RULE)]
Version = Annotated[str, Meta(pattern=versions.PATTERN, description="vMAJOR.MINOR, compared numerically "
                                                                    "(v1.10 > v1.9)", examples=["v1.0", "v2.3"])]
Tag = Text(MAX_TAG)
Tags = Annotated[list[Tag], Meta(max_length=MAX_TAGS)]
Metrics = Annotated[dict[str, int | float], Meta(
    description="metric name to number", examples=[{"accuracy": 0.9234, "f1_score": 0.9038}],
    extra_json_schema={"propertyNames": {"$ref": "#/components/schemas/SafeKey"}})]
# A JSON object whose content the service does not interpret.
JsonObject = dict[str, Any]
# Arbitrary JSON: the library checks it is an object; check_json_value the rest.
SafeJsonObject = Annotated[JsonObject, Meta(
    description="any JSON object whose keys, at every depth, neither start with '$' nor contain '.'",
    extra_json_schema={"propertyNames": {"$ref": "#/components/schemas/SafeKey"},
                       "additionalProperties": {"$ref": "#/components/schemas/SafeJsonValue"}})]
Timestamp = Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$",
                                description="ISO-8601 UTC with milliseconds and a Z",
                                examples=["2026-11-27T05:32:57.226Z"],
                                extra_json_schema={"format": "date-time"})]
Count = Annotated[int, Meta(ge=0)]
DownloadPath = Annotated[str, Meta(pattern="^" + urls.MODEL_DOWNLOAD.replace("{id}", "[0-9a-f]{24}") + "$")]
Checksum = Annotated[str, Meta(pattern="^sha256:[0-9a-f]{64}$")]
# The path rules are app.snapshots' (400 invalid_path, naming the rule); the lengths here only document them.
SnapshotPath = Annotated[str, Meta(extra_json_schema={"minLength": 1, "maxLength": 1024}, description=(
    "relative, '/'-separated, NFC-normalized UTF-8; components non-empty, not '.' or '..', without control "
    "characters, '\\' or ':', not ending in a dot or a space, at most 255 bytes; at most 1024 bytes in all"))]
ContentType = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[\x21-\x7e][\x20-\x7e]*$",
                                  description="a media type (printable ASCII)")]
Digest = Annotated[str, Meta(pattern="^sha256:[0-9a-f]{64}$", description="sha256: and 64 lowercase hex digits")]
CheckResult = Annotated[str, Meta(min_length=1, description="'healthy', or the reason the check failed")]

# Components of their own, referenced wherever the type appears.
NAMED: dict[str, object] = {"ObjectId": ObjectId, "ModelName": ModelName, "Version": Version, "Status": Status,
                            "Tags": Tags, "Metrics": Metrics, "SafeJsonObject": SafeJsonObject,
                            "CheckResult": CheckResult}
# What SafeJsonObject refers to: JSON Schema only, enforced by check_json_value.
SAFE_JSON_SCHEMAS: dict[str, object] = {
    "SafeKey": {"type": "string", "pattern": r"^[^$.][^.]*$",
                "description": "a non-empty key that neither starts with '$' nor contains '.'"},
    "SafeJsonValue": {"anyOf": [
        {"type": ["string", "number", "boolean", "null"]},
        {"type": "array", "items": {"$ref": "#/components/schemas/SafeJsonValue"}},
        {"$ref": "#/components/schemas/SafeJsonObject"},
    ]},
}


# --------------------------------------------------------------------------- request bodies


class ModelUpdate(Struct, kw_only=True, forbid_unknown_fields=True):
    """The mutable fields; each one given replaces the stored value."""

    hyperparameters: SafeJsonObject | UnsetType = UNSET
    metrics: Metrics | UnsetType = UNSET
    dataset_info: SafeJsonObject | UnsetType = UNSET
    tags: Tags | UnsetType = UNSET
    status: Annotated[Status, Meta(description="active when registering unless given")] | UnsetType = UNSET
    description: Description | UnsetType = UNSET

    def __post_init__(self) -> None:
        for field in ("hyperparameters", "metrics", "dataset_info"):
            value = getattr(self, field)
            if value is not UNSET:
                check_json_value(value, field)
        if self.metrics is not UNSET:
            for k, v in self.metrics.items():
                if not math.isfinite(v):
                    raise ValueError(f"metrics.{k}: must be a number")


class FileEntryIn(Struct, forbid_unknown_fields=True):
    """A file of a snapshot being committed; its blob must already be stored (PUT /api/v1/blobs/...)."""

    path: SnapshotPath
    checksum: Digest
    size_bytes: Annotated[int, Meta(ge=0, le=2**63 - 1)]
    content_type: Annotated[ContentType, Meta(
        description="by default from the path's extension, else application/octet-stream")] | UnsetType = UNSET


class _Provenance(ModelUpdate, kw_only=True):
    """What a registration and a new version may set beyond the mutable fields."""

    created_by: ShortText | UnsetType = UNSET
    format: Format | UnsetType = UNSET
    version: Annotated[Version, Meta(description="ask for this version number (409 if it exists); "
                                                 "by default the next one is chosen")] | UnsetType = UNSET
    breaking_changes: Annotated[bool, Meta(
        description="number the automatic version vMAJOR+1.0 instead of vMAJOR.MINOR+1",
        extra_json_schema={"default": False})] | UnsetType = UNSET
    files: Annotated[list[FileEntryIn], Meta(min_length=1, description=(
        "commit a multi-file snapshot: the version is created with all these files at once, or not at all "
        "(422 missing_blobs when a blob is not stored); at most MAX_FILES_PER_VERSION, paths unique "
        "(also after case folding) and no path a folder of another"))] | UnsetType = UNSET

    def __post_init__(self) -> None:
        super().__post_init__()
        # The pattern's $ also matches before a final newline: fullmatch decides.
        if self.version is not UNSET and not versions.is_valid(self.version):
            raise ValueError(f"version: {VERSION_RULE}")


class NewVersion(_Provenance, kw_only=True):
    """Fields that differ from the source model; everything else is inherited."""

    algorithm: Algorithm | UnsetType = UNSET


class ModelRegistration(_Provenance, kw_only=True):
    """POST /api/v1/models (as JSON, or as the multipart 'metadata' part)."""

    # In this order: a body with neither is told about the name first (msgspec reports the first missing).
    name: ModelName
    algorithm: Algorithm

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise ValueError(f"name: {NAME_RULE}")
        super().__post_init__()


# --------------------------------------------------------------------------- answers


class FileMetadata(Struct, forbid_unknown_fields=True):
    file_id: ObjectId
    filename: Annotated[str, Meta(description="as uploaded (last path component), else <name>-<version>")]
    size_bytes: Count
    checksum: Checksum
    format: Annotated[str | None, Meta(description="the model's format, else the file name's extension, else null")]
    content_type: Annotated[str, Meta(description="the Content-Type the file was uploaded with")]
    chunk_size: Annotated[int, Meta(ge=1)]
    uploaded_at: Timestamp


class FileEntry(Struct, forbid_unknown_fields=True):
    """A file of a version (a single-file version has one, from its file_metadata)."""

    path: Annotated[str, Meta(description="for a single-file version, its file_metadata.filename")]
    size_bytes: Count
    checksum: Checksum
    content_type: str


class SnapshotManifest(Struct, forbid_unknown_fields=True):
    """GET /api/v1/models/{id}/files: what a client needs to fetch a version's files and check them."""

    id: ObjectId
    name: ModelName
    version: Version
    files: Annotated[list[FileEntry], Meta(description="in path order (UTF-8 bytes)")]
    snapshot_digest: Annotated[Checksum, Meta(
        description="sha256 of the sorted (sha256, size, path) lines (README); also the ETag, without sha256:")]
    total_size_bytes: Count


class FileInfo(FileMetadata, forbid_unknown_fields=True):
    model_id: ObjectId
    chunk_count: Count
    download_url: DownloadPath


class ModelSummary(Struct, forbid_unknown_fields=True):
    """A model in lists."""

    id: ObjectId
    name: ModelName
    version: Version
    algorithm: str
    status: Status
    tags: list[str]
    metrics: dict[str, int | float]
    created_by: str | None
    created_at: Timestamp
    download_count: Count
    size_bytes: Annotated[Count | None, Meta(
        description="the total size of the version's files; null while it has none")]
    file_count: Annotated[Count, Meta(description="how many files the version has; absent while none")] \
        | UnsetType = UNSET
    snapshot_digest: Annotated[Checksum, Meta(
        description="the snapshot digest (README); absent while the version has no file")] | UnsetType = UNSET


class Model(Struct, forbid_unknown_fields=True):
    """The full model document."""

    id: ObjectId
    name: ModelName
    version: Version
    algorithm: str
    status: Status
    description: str | None
    hyperparameters: JsonObject
    metrics: dict[str, int | float]
    dataset_info: JsonObject
    tags: list[str]
    format: str | None
    parent_model_id: Annotated[ObjectId | None, Meta(
        description="the version this one was made from (the name's previous latest)")]
    created_by: str | None
    created_at: Timestamp
    updated_at: Timestamp
    download_count: Count
    download_url: DownloadPath
    file_metadata: Annotated[FileMetadata, Meta(description="present once a file is uploaded")] | UnsetType = UNSET
    model_size: Annotated[str, Meta(description="human-readable file size (decimal units), with file_metadata",
                                    examples=["45.7 MB"])] | UnsetType = UNSET
    files: Annotated[list[FileEntry], Meta(
        description="the version's files in path order (UTF-8 bytes); absent while it has none")] | UnsetType = UNSET
    snapshot_digest: Annotated[Checksum, Meta(
        description="sha256 of the sorted (sha256, size, path) lines (README); with files")] | UnsetType = UNSET
    total_size_bytes: Annotated[Count, Meta(description="the sum of the files' sizes; with files")] \
        | UnsetType = UNSET


class Pagination(Struct, forbid_unknown_fields=True):
    page: Annotated[int, Meta(ge=1)]
    limit: Annotated[int, Meta(ge=1)]
    total: Count
    pages: Count


class ModelList(Struct, forbid_unknown_fields=True):
    models: list[ModelSummary]
    pagination: Pagination


class ModelTop(Struct, forbid_unknown_fields=True):
    models: list[ModelSummary]


class VersionList(Struct, forbid_unknown_fields=True):
    name: ModelName
    versions: Annotated[list[ModelSummary], Meta(min_length=1, description="newest first")]


class RegistrationAnswer(Struct, forbid_unknown_fields=True):
    success: Literal[True]
    message: Literal["Model registered successfully"]
    model_id: ObjectId
    version: Version
    download_url: DownloadPath


class UploadAnswer(Struct, forbid_unknown_fields=True):
    success: Literal[True]
    model_id: ObjectId
    file_metadata: FileMetadata


class UpdateAnswer(Struct, forbid_unknown_fields=True):
    success: Literal[True]
    message: Literal["Model updated successfully"]
    model: Model


class DeleteAnswer(Struct, forbid_unknown_fields=True):
    success: Literal[True]
    message: Literal["Model deleted successfully"]
    deleted_id: ObjectId


class ErrorDetail(Struct, forbid_unknown_fields=True):
    code: Annotated[str, Meta(min_length=1)]
    message: Annotated[str, Meta(min_length=1)]


class Error(Struct, forbid_unknown_fields=True):
    """The one shape every failure takes, whatever the status."""

    error: ErrorDetail


class StorageUsage(Struct, forbid_unknown_fields=True):
    total_size_bytes: Annotated[Count, Meta(description="stored content, a file shared by models counted once")]
    total_size_gb: Annotated[float, Meta(ge=0)]
    average_model_size_mb: Annotated[float, Meta(ge=0)]


class RecentActivity(Struct, forbid_unknown_fields=True):
    models_added_last_7_days: Count
    downloads_last_24_hours: Count


StatusDistribution = defstruct("StatusDistribution", [(s, Count) for s in STATUSES], forbid_unknown_fields=True,
                               module=__name__)


class Statistics(Struct, forbid_unknown_fields=True):
    total_models: Count
    algorithms: Annotated[dict[str, Count], Meta(description="models per algorithm, most common first")]
    status_distribution: StatusDistribution
    total_downloads: Count
    storage_usage: StorageUsage
    recent_activity: RecentActivity
    timestamp: Timestamp


StorageKind = Literal["embedded", "mongodb"]


class Health(Struct, forbid_unknown_fields=True):
    status: Literal["healthy", "unhealthy"]
    service: Literal["model-service"]
    storage: StorageKind
    mongodb_connected: Annotated[bool | None, Meta(description="null on the embedded backend")]
    gridfs_available: Annotated[bool | None, Meta(description="null on the embedded backend")]
    total_models: Annotated[Count | None, Meta(description="null when the store did not answer")]
    timestamp: Timestamp
    error: Annotated[str, Meta(description="why the store is unhealthy, when it is")] | UnsetType = UNSET
    draining: Annotated[Literal[True], Meta(
        description="present while the instance shuts down (then 503)")] | UnsetType = UNSET


class Checks(Struct, forbid_unknown_fields=True):
    storage: Annotated[CheckResult, Meta(description="the store answers a ping")]
    files: Annotated[CheckResult, Meta(description="GridFS or the data folder is readable and writable")]
    disk_space: Annotated[CheckResult, Meta(description="free space above HEALTH_MIN_FREE_DISK, where known")]
    model_registry: Annotated[CheckResult, Meta(
        description="a sample of the newest models with files point at stored content")]
    shutdown: Annotated[str, Meta(description="present (never healthy) while the instance drains")] | UnsetType = UNSET


class StoredBytes(Struct, forbid_unknown_fields=True):
    total_size_bytes: Count


class DetailedHealth(Struct, forbid_unknown_fields=True):
    status: Annotated[Literal["healthy", "unhealthy"], Meta(description="unhealthy when any check is not healthy")]
    service: Literal["model-service"]
    storage: StorageKind
    checks: Checks
    total_models: Annotated[Count | None, Meta(description="null when the store is unhealthy")]
    active_models: Count | None
    storage_usage: StoredBytes | None
    timestamp: Timestamp
    disk_free_bytes: Annotated[Count | None, Meta(description="null where the backend cannot tell")]


MAX_BATCH_IDS = 1000
BatchOperation = Literal["delete", "update_status", "add_tags", "remove_tags"]
BatchResultKind = Literal["ok", "not_found", "invalid_id"]


class BatchResult(Struct, forbid_unknown_fields=True):
    id: str
    result: BatchResultKind


BatchSummary = defstruct("BatchSummary", [(r, Count) for r in get_args(BatchResultKind)],
                         forbid_unknown_fields=True, module=__name__)


class BatchAnswer(Struct, forbid_unknown_fields=True):
    operation: BatchOperation
    results: Annotated[list[BatchResult], Meta(max_length=MAX_BATCH_IDS, description="one per requested id, in order")]
    summary: BatchSummary


MAX_BLOB_DIGESTS = 10_000


class BlobsMissingRequest(Struct, forbid_unknown_fields=True):
    """POST /api/v1/blobs/missing."""

    digests: Annotated[list[Digest], Meta(min_length=1, max_length=MAX_BLOB_DIGESTS,
                                          description="duplicates are allowed and answered once")]


class BlobsMissingAnswer(Struct, forbid_unknown_fields=True):
    missing: Annotated[list[Digest], Meta(description="the digests not stored, in request order, each once")]


class BlobAnswer(Struct, forbid_unknown_fields=True):
    digest: Digest
    size_bytes: Count


class MissingBlobsDetail(Struct, forbid_unknown_fields=True):
    code: Literal["missing_blobs"]
    message: Annotated[str, Meta(min_length=1)]
    missing: Annotated[list[Digest], Meta(min_length=1, description="the commit's digests not stored (or "
                                                                    "stored with another size), each once")]


class MissingBlobsError(Struct, forbid_unknown_fields=True):
    """422 of a commit: the one error shape, plus the digests to upload first."""

    error: MissingBlobsDetail


class UploadSessionRequest(Struct, forbid_unknown_fields=True):
    """POST /api/v1/uploads (the body is optional: no body announces nothing)."""

    size_bytes: Annotated[Count | None, Meta(description="the whole content's size, if known; "
                                                          "completion checks it")] = None
    checksum: Annotated[Digest | None, Meta(description="the whole content's sha256, if known: a stored blob "
                                                        "answers 201 at once; completion checks it")] = None


class UploadSessionAnswer(Struct, forbid_unknown_fields=True):
    id: Annotated[str, Meta(pattern="^[0-9a-f]{24}$")]
    offset: Annotated[Count, Meta(description="bytes stored so far; the next chunk starts here")]
    size_bytes: Count | None
    checksum: Digest | None
    expires_at: Annotated[Timestamp, Meta(description="UPLOAD_SESSION_TTL after its last change; each accepted "
                                                      "chunk moves it")]


class UploadOffsetDetail(Struct, forbid_unknown_fields=True):
    code: Literal["upload_offset_mismatch"]
    message: Annotated[str, Meta(min_length=1)]
    offset: Annotated[Count, Meta(description="the session's offset: where the next chunk must start")]


class UploadOffsetError(Struct, forbid_unknown_fields=True):
    """416 of a chunk that does not start at the session's offset."""

    error: UploadOffsetDetail


# Response components whose JSON Schema needs more than the Struct says.
EXTRA_SCHEMA: dict[str, dict[str, object]] = {
    "Model": {"dependentRequired": {"file_metadata": ["model_size"], "model_size": ["file_metadata"],
                                    "files": ["snapshot_digest", "total_size_bytes"],
                                    "snapshot_digest": ["files"], "total_size_bytes": ["files"]}},
    "ModelSummary": {"dependentRequired": {"file_count": ["snapshot_digest"], "snapshot_digest": ["file_count"]}},
}

REQUESTS = (ModelRegistration, NewVersion, ModelUpdate, BlobsMissingRequest, UploadSessionRequest)
ANSWERS = (Error, FileMetadata, FileEntry, SnapshotManifest, FileInfo, ModelSummary, Model, Pagination, ModelList,
           ModelTop, VersionList, RegistrationAnswer, UploadAnswer, UpdateAnswer, DeleteAnswer, Statistics, Health,
           DetailedHealth, BatchAnswer, BlobsMissingAnswer, BlobAnswer, MissingBlobsError, UploadSessionAnswer,
           UploadOffsetError)
