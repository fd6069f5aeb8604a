"""The API's URL templates that answers also point at (Location, download_url).

The routes themselves, with their methods, handlers and scopes, are the table
in app/routes.py; it builds its paths from these. A leaf module, so handlers
and renderers can make URLs without importing the table (which imports them).
"""

API = "/api/v1"
OPENAPI_JSON = API + "/openapi.json"
MODELS = API + "/models"
MODEL = MODELS + "/{id}"
MODEL_DOWNLOAD = MODEL + "/download"
MODEL_FILES = MODEL + "/files"
# {path} takes the rest of the URL, slashes included (app/handlers/files.requested_path decodes it).
FILE_PATH = "/{path:[\\s\\S]+}"
BLOBS = API + "/blobs"
BLOB = BLOBS + "/{digest}"
UPLOADS = API + "/uploads"
UPLOAD = UPLOADS + "/{upload_id}"


def model_url(model_id: str) -> str:
    return MODEL.format(id=model_id)


def download_url(model_id: str) -> str:
    return MODEL_DOWNLOAD.format(id=model_id)


def files_url(model_id: str) -> str:
    return MODEL_FILES.format(id=model_id)


def blob_url(sha256: str) -> str:
    return BLOB.format(digest=f"sha256:{sha256}")


def upload_url(session_id: str) -> str:
    return UPLOAD.format(upload_id=session_id)
