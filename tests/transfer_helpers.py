"""Helpers for the HTTP file-transfer tests (tests/test_transfers.py).

Everything here talks real HTTP to the app, except ``leftovers`` and
``stored_ids``, which look into the app's storage to show what a request left
behind (documents, chunks, temp files, blobs).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import aiohttp
from bson import ObjectId

from app.storage import DEFAULT_CHUNK_SIZE

MODELS = "/api/v1/models"
CS = DEFAULT_CHUNK_SIZE
HEX24 = re.compile(r"^[0-9a-f]{24}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
# Every transfer request gets a deadline: a body shorter than its Content-Length
# must fail the test, not hang it.
TIMEOUT = aiohttp.ClientTimeout(total=30)
FILE_METADATA_FIELDS = {"file_id", "filename", "size_bytes", "checksum", "format", "content_type", "chunk_size",
                        "uploaded_at"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int) -> bytes:
    """Random bytes: no two tests (or uploads) share content by accident."""
    return os.urandom(size)


async def leftovers(storage) -> dict[str, Any]:
    """What a backend holds for files: documents and chunks, or temp files and blobs."""
    if storage.kind == "mongodb":
        return {
            "files": await storage.files.count_documents({}),
            "chunks": await storage.chunks.count_documents({}),
        }
    tmp = sorted(p.name for p in Path(storage.tmp_dir).iterdir())
    blobs = sorted(p.name for p in Path(storage.blob_dir).rglob("*") if p.is_file())
    return {"tmp": tmp, "blobs": blobs}


def new_temp_file_has_bytes(tmp_dir: Path, known: list[str]) -> bool:
    """Whether a temp file not in ``known`` holds bytes: an embedded upload under way."""
    for p in tmp_dir.iterdir():
        try:
            if p.name not in known and p.stat().st_size > 0:
                return True
        except FileNotFoundError:
            pass  # removed while we looked
    return False


async def upload_under_way(storage, before: dict[str, Any]) -> bool:
    """Whether an unfinished upload has put some of its bytes in the store since ``before`` (leftovers)."""
    if storage.kind == "mongodb":
        return await storage.chunks.count_documents({}) > before["chunks"]
    return new_temp_file_has_bytes(Path(storage.tmp_dir), before["tmp"])


async def content_stored(storage, file_id: str, sha256: str) -> bool:
    """Whether the store still holds this file's content (any trace of it)."""
    if storage.kind == "mongodb":
        oid = ObjectId(file_id)
        return bool(await storage.files.count_documents({"_id": oid})
                    or await storage.chunks.count_documents({"files_id": oid}))
    return Path(storage.blob_path(sha256)).exists()


async def json_of(resp, status: int) -> Any:
    text = await resp.text()
    assert resp.status == status, f"expected {status}, got {resp.status}: {text[:500]}"
    assert resp.content_type == "application/json", f"content type {resp.content_type!r}: {text[:200]}"
    return await resp.json()


async def error_code(resp, status: int) -> str:
    """The ``error.code`` of an error answer, after checking its status and shape."""
    body = await json_of(resp, status)
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("code"), str) and body["error"]["code"], body
    assert isinstance(body["error"].get("message"), str) and body["error"]["message"], body
    return body["error"]["code"]


async def register(client, name: str | None = None, **fields: Any) -> str:
    """Register a model (JSON, no file); return its id."""
    body = {"name": name or f"m_{secrets.token_hex(4)}", "algorithm": "random_forest", **fields}
    resp = await client.post(MODELS, json=body)
    answer = await json_of(resp, 201)
    assert HEX24.match(answer["model_id"]), answer
    return answer["model_id"]


async def get_model(client, model_id: str) -> dict[str, Any]:
    return await json_of(await client.get(f"{MODELS}/{model_id}"), 200)


async def download_count(client, model_id: str) -> int:
    return (await get_model(client, model_id))["download_count"]


def check_upload_answer(answer: dict[str, Any], model_id: str, data: bytes) -> dict[str, Any]:
    """The 201 answer of an upload, as the specification shapes it; returns file_metadata."""
    assert answer["success"] is True, answer
    assert answer["model_id"] == model_id, answer
    fm = answer["file_metadata"]
    assert FILE_METADATA_FIELDS <= set(fm), f"file_metadata lacks {FILE_METADATA_FIELDS - set(fm)}: {fm}"
    assert isinstance(fm["file_id"], str) and HEX24.match(fm["file_id"]), fm
    assert fm["size_bytes"] == len(data), fm
    assert fm["checksum"] == "sha256:" + sha(data), fm
    assert fm["chunk_size"] == CS, fm
    assert isinstance(fm["filename"], str) and fm["filename"], fm
    assert isinstance(fm["content_type"], str) and fm["content_type"], fm
    assert fm["format"] is None or isinstance(fm["format"], str), fm
    assert isinstance(fm["uploaded_at"], str) and ISO_UTC.match(fm["uploaded_at"]), fm
    return fm


async def upload_raw(client, model_id: str, data, *, filename: str | None = "model.bin", method: str = "POST",
                     headers: dict[str, str] | None = None, params: dict[str, str] | None = None):
    """Send a raw-body upload; return the response (unread)."""
    q = dict(params or {})
    if filename is not None:
        q["filename"] = filename
    h = {"Content-Type": "application/octet-stream", **(headers or {})}
    return await client.request(method, f"{MODELS}/{model_id}/upload", data=data, headers=h, params=q,
                                timeout=TIMEOUT)


async def upload_ok(client, model_id: str, data: bytes, filename: str = "model.bin", **kw) -> dict[str, Any]:
    """Upload raw bytes and check the 201 answer; return its file_metadata."""
    resp = await upload_raw(client, model_id, data, filename=filename, **kw)
    return check_upload_answer(await json_of(resp, 201), model_id, data)


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None
    disposition_extra: str = ""  # appended verbatim to Content-Disposition


def multipart(parts: Iterable[Part], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body built by hand, so tests control every header byte."""
    boundary = boundary or "----transfer-test-" + secrets.token_hex(12)
    out = bytearray()
    for p in parts:
        disp = f'form-data; name="{p.name}"'
        if p.filename is not None:
            disp += f'; filename="{p.filename}"'
        disp += p.disposition_extra
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if p.content_type:
            out += f"Content-Type: {p.content_type}\r\n".encode()
        out += b"\r\n" + p.data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


async def post_multipart(client, path: str, parts: Iterable[Part], method: str = "POST",
                         headers: dict[str, str] | None = None, params: dict[str, str] | None = None):
    body, ctype = multipart(parts)
    return await client.request(method, path, data=body, headers={"Content-Type": ctype, **(headers or {})},
                                params=params, timeout=TIMEOUT)


def parse_content_range(value: str | None) -> tuple[int, int, int]:
    assert value is not None, "no Content-Range header"
    m = CONTENT_RANGE.match(value)
    assert m, f"malformed Content-Range {value!r}"
    first, last, size = (int(g) for g in m.groups())
    assert first <= last < size, f"impossible Content-Range {value!r}"
    return first, last, size


def parse_byteranges(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Split a multipart/byteranges body (RFC 9110 section 14.6 / RFC 2046) into (headers, data) parts.

    Strict about the framing: every part is introduced by CRLF--boundary, has
    headers ending in an empty line, and the body ends with the close delimiter.
    """
    m = re.match(r'^multipart/byteranges;\s*boundary="?([^";]+)"?\s*$', content_type)
    assert m, f"not multipart/byteranges with a boundary: {content_type!r}"
    boundary = m.group(1).encode()
    delimiter = b"\r\n--" + boundary
    if body.startswith(b"--" + boundary):
        body = b"\r\n" + body  # the first delimiter may omit its CRLF
    segments = body.split(delimiter)
    assert len(segments) >= 3, f"fewer than one part in {body[:200]!r}"
    assert segments[0] == b"", f"unexpected preamble {segments[0][:100]!r}"
    closing = segments[-1]
    assert closing.startswith(b"--"), f"no close delimiter: {closing[:50]!r}"
    assert closing[2:].strip(b"\r\n \t") == b"", f"unexpected epilogue {closing[:80]!r}"
    parts = []
    for seg in segments[1:-1]:
        assert seg.startswith(b"\r\n"), f"part does not start with CRLF: {seg[:50]!r}"
        head, sep, data = seg[2:].partition(b"\r\n\r\n")
        assert sep, f"part without header/body separator: {seg[:200]!r}"
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            key, colon, value = line.partition(":")
            assert colon, f"malformed part header line {line!r}"
            headers[key.strip().lower()] = value.strip()
        parts.append((headers, data))
    return parts


def check_ranges_response(status: int, headers, body: bytes, data: bytes,
                          expected: list[tuple[int, int]]) -> None:
    """A 206 answer carries exactly the ``expected`` (first, last) spans, in that order, each byte exact.

    ``expected`` is what the server must send after coalescing: one span is a
    plain 206 with Content-Range, several are multipart/byteranges parts.
    """
    size = len(data)
    assert status == 206, f"expected 206, got {status}"
    assert int(headers["Content-Length"]) == len(body)
    ctype = headers["Content-Type"]
    spans = []
    if len(expected) > 1:
        assert ctype.startswith("multipart/byteranges"), f"{len(expected)} spans in a {ctype!r} answer"
        assert "Content-Range" not in headers, "a multipart 206 must not carry Content-Range itself"
        for part_headers, part_data in parse_byteranges(body, ctype):
            first, last, total = parse_content_range(part_headers.get("content-range"))
            assert total == size
            assert part_data == data[first:last + 1], f"part {first}-{last} has the wrong bytes"
            spans.append((first, last))
    else:
        assert ctype == "application/octet-stream", ctype
        first, last, total = parse_content_range(headers.get("Content-Range"))
        assert total == size
        assert body == data[first:last + 1], f"range {first}-{last} has the wrong bytes"
        spans.append((first, last))
    assert spans == expected, f"sent spans {spans}, expected exactly {expected}"
