"""Helpers for the snapshot tests: committing a snapshot through the API, and the tar it must download as.

Snapshots are made as a client makes them (PUT each blob, then one commit);
the expected tar is written by Python's tarfile, an implementation that is
not ours.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import Any

from tests.transfer_helpers import MODELS, TIMEOUT, json_of

BLOBS = "/api/v1/blobs"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_list(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return [{"path": path, "checksum": f"sha256:{sha(data)}", "size_bytes": len(data)} for path, data in files.items()]


async def put_blob(client, data: bytes) -> None:
    resp = await client.put(f"{BLOBS}/sha256:{sha(data)}", data=data, timeout=TIMEOUT)
    assert resp.status in (200, 201), (resp.status, await resp.text())


async def commit(client, name: str | None, files: dict[str, bytes], path: str = MODELS, **fields: Any) -> str:
    """Upload the files' blobs and commit them as a new model named ``name``, or (``name`` None,
    ``path`` a model's /versions) as a new version of that model; its id."""
    for data in files.values():
        await put_blob(client, data)
    named = {"name": name, "algorithm": "transformer"} if name is not None else {}
    body = {**named, "files": file_list(files), **fields}
    answer = await json_of(await client.post(path, json=body, timeout=TIMEOUT), 201)
    return answer["model_id"]


def snapshot_digest(files: dict[str, bytes]) -> str:
    """The contract's digest, recomputed here: one "<sha256> <size> <path>\\n" line per file in path order."""
    lines = "".join(f"{sha(data)} {len(data)} {path}\n"
                    for path, data in sorted(files.items(), key=lambda item: item[0].encode()))
    return "sha256:" + sha(lines.encode())


def tar_of(files: dict[str, bytes], mtime: int) -> bytes:
    """The snapshot's tar as Python's tarfile writes it (pax, the contract's fixed fields, path order),
    without the padding to a 10240-byte record that tarfile adds and the service leaves out."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, data in sorted(files.items(), key=lambda item: item[0].encode()):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    written = out.getvalue()
    members = tar_members(written)
    last = members[-1] if members else None
    end = (last.offset_data + last.size + -last.size % 512 if last else 0) + 2 * 512
    assert written[end:] == bytes(len(written) - end)
    return written[:end]


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        return tar.getmembers()
