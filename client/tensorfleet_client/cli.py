"""The client's commands: push, pull, list, show, versions, rm, stats.

push and pull take a folder too: a snapshot (a version made of many files).

The server's ``model-service`` command adds them with ``add_client_commands``;
``tensorfleet-client`` (``python -m tensorfleet_client``, ``main`` here) is the
same commands where only the client is installed.

Exit codes scripts can test: 0 ok, 1 error, 2 usage (including values the
service rejects as invalid), 3 not found, 4 checksum mismatch, 130 interrupted.
``--json`` prints one JSON document on stdout; progress bars go to stderr and
only when it is a terminal.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import rules

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CHECKSUM, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

_USAGE_CODES = {"validation_error", "invalid_id", "invalid_parameter", "invalid_json", "unknown_field",
                "immutable_field", "invalid_filename", "invalid_checksum"}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*[bB]?\s*$")


# -- argument types ----------------------------------------------------------


def parse_rate(value: str) -> float:
    """A speed as curl's --limit-rate takes it: bytes a second, or with k, M, G (powers of 1024)."""
    m = _RATE_RE.match(value)
    if not m or float(m[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a rate: {value!r} (for example 500k, 50M, 1G)")
    return float(m[1]) * 1024 ** " kmg".index(m[2].lower() or " ")


def _key_value(value: str) -> tuple[str, str]:
    key, sep, raw = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    return key.strip(), raw


def _metric(value: str) -> tuple[str, float]:
    key, raw = _key_value(value)
    try:
        return key, float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"metric {key} must be a number, got {raw!r}") from None


def _param(value: str) -> tuple[str, Any]:
    """A hyperparameter: JSON when it parses (150, 0.1, true, [1, 2]), else the string."""
    key, raw = _key_value(value)
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _version(value: str) -> str:
    if not rules.is_version(value):
        raise argparse.ArgumentTypeError(f"version must be {rules.VERSION_RULE}, got {value!r}")
    return value


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 32:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 32, got {value!r}")
    return n


def _byte_size(value: str) -> int:
    from .sessions import parse_size

    try:
        return parse_size(value, "size")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r} (for example 64MiB, 512k, 1073741824)") from None


def _chunk_size(value: str) -> int:
    from .sessions import CLI_MIN_CHUNK, MAX_CHUNK

    n = _byte_size(value)
    if not CLI_MIN_CHUNK <= n <= MAX_CHUNK:
        raise argparse.ArgumentTypeError(f"must be from {CLI_MIN_CHUNK >> 20} MiB to {MAX_CHUNK >> 20} MiB, "
                                         f"got {value!r}")
    return n


def _retries(value: str) -> int:
    if not value.isdigit() or int(value) > 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 100, got {value!r}")
    return int(value)


# -- output ------------------------------------------------------------------


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    """Decimal units, as the service's sizes are: 45.7 MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _size(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def _metrics(m: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in (m or {}).items()) or "-"


def _model_rows(models: list[dict]) -> list[list[str]]:
    return [[m["id"], m["name"], m["version"], m["algorithm"], m["status"], _size(m.get("size_bytes")),
             _metrics(m.get("metrics")), m["created_at"][:19].replace("T", " ")] for m in models]


_MODEL_HEADERS = ["ID", "NAME", "VERSION", "ALGORITHM", "STATUS", "SIZE", "METRICS", "CREATED"]


class _Bar:
    """A tqdm bar on stderr, driven by the client's ``progress(done, total)`` callback."""

    def __init__(self, label: str) -> None:
        # The size as shutil finds it: a terminal that reports 0x0 (a bare pty) gets 80x24; tqdm would take
        # it for no room at all and draw nothing.
        from tqdm import tqdm  # here: a pull that draws no bar (--no-progress, not a terminal) never loads it

        size = shutil.get_terminal_size()
        self._bar = tqdm(desc=label, unit="B", unit_scale=True, unit_divisor=1000, file=sys.stderr,
                         ncols=size.columns, nrows=size.lines, mininterval=0.1)
        self._started = False

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        if not self._started:
            # What an interrupted push or pull left done counts as done already, not as speed.
            self._started = True
            self._bar.initial = self._bar.n = self._bar.last_print_n = done
            self._bar.refresh()
            return
        self._bar.update(done - self._bar.n)  # less than before when a download starts over

    def close(self) -> None:
        self._bar.close()


def _progress(args: argparse.Namespace, label: str) -> _Bar | None:
    if getattr(args, "no_progress", False) or not sys.stderr.isatty():
        return None
    return _Bar(label)


# -- running a command -------------------------------------------------------


class _Usage(Exception):
    pass


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"{args.prog} {args.command}: error: {message}", file=sys.stderr)


def _exit_code(e: BaseException) -> int:
    from .errors import BadRequest, ChecksumMismatch, NotFound

    if isinstance(e, ChecksumMismatch):
        return EXIT_CHECKSUM
    if isinstance(e, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(e, BadRequest) and e.code in _USAGE_CODES:
        return EXIT_USAGE
    return EXIT_ERROR


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _command(fn: Callable[[Any, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # The client's modules load here with the collector off, then stay out of its way (frozen): the
        # objects an import makes live as long as the process, and collecting among them was a tenth of a
        # small pull's start-up.
        gc.disable()
        try:
            from .errors import ModelServiceError
            from .sync import ModelServiceClient
            from .transport import RetryPolicy
        finally:
            gc.freeze()
            gc.enable()

        # SIGTERM cleans up like Ctrl-C: a download saves where it got to.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        options: dict[str, Any] = {} if args.retries is None else {"retry": RetryPolicy(attempts=args.retries + 1)}
        if getattr(args, "session_threshold", None) is not None:
            options["session_threshold"] = args.session_threshold
        if getattr(args, "chunk_size", None) is not None:
            options["chunk_size"] = args.chunk_size
        client = None
        try:
            client = ModelServiceClient(args.url, args.api_key, **options)
            return fn(client, args)
        except _Usage as e:
            _fail(args, str(e))
            return EXIT_USAGE
        except ModelServiceError as e:
            _fail(args, str(e))
            return _exit_code(e)
        except (OSError, ValueError) as e:
            _fail(args, str(e))
            return EXIT_USAGE if isinstance(e, ValueError) else EXIT_ERROR
        except KeyboardInterrupt:
            print(f"\n{args.prog} {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        finally:
            try:
                if client is not None:
                    client.close()
            finally:
                signal.signal(signal.SIGTERM, previous)

    return run


# -- the commands ------------------------------------------------------------


def _push(client, args: argparse.Namespace) -> int:
    metadata: dict[str, Any] = {"name": args.name, "algorithm": args.algorithm}
    if args.metric:
        metadata["metrics"] = dict(args.metric)
    if args.param:
        metadata["hyperparameters"] = dict(args.param)
    if args.tag:
        metadata["tags"] = args.tag
    for field in ("version", "description", "created_by", "format"):
        if getattr(args, field) is not None:
            metadata[field] = getattr(args, field)
    if args.breaking:
        metadata["breaking_changes"] = True

    path = Path(args.path)
    if path.is_dir():
        return _push_folder(client, args, path, metadata)
    if not path.is_file():
        raise _Usage(f"no such file or folder: {path}")
    bar = _progress(args, f"push {path.name}")
    started = time.monotonic()
    try:
        model_id = client.push(path, progress=_telling_resume(path, bar), **metadata)
    finally:
        if bar:
            bar.close()
    seconds = time.monotonic() - started
    doc = client.get_model(model_id)
    fm = doc.get("file_metadata", {})
    if args.json:
        _print_json({"model_id": model_id, "name": doc["name"], "version": doc["version"],
                     "size": fm.get("size_bytes"), "checksum": fm.get("checksum"), "seconds": round(seconds, 3)})
    else:
        print(f"pushed {doc['name']} {doc['version']}  id {model_id}  {_size(fm.get('size_bytes'))}  "
              f"{fm.get('checksum')}")
    return EXIT_OK


def _telling_resume(path: Path, bar: _Bar | None) -> Callable[[int, int], None]:
    """The progress callback of a push: a first report past 0 is an upload session an interrupted push left."""
    first = True

    def progress(done: int, total: int) -> None:
        nonlocal first
        if first and done > 0:
            print(f"resuming {path.name}: {format_bytes(done)} of {format_bytes(total)} already on the service",
                  file=sys.stderr)
        first = False
        if bar:
            bar(done, total)

    return progress


def _push_folder(client, args: argparse.Namespace, path: Path, metadata: dict[str, Any]) -> int:
    bar = _progress(args, f"push {path.name}/")
    try:
        result = client.push_folder(path, progress=bar, **metadata)
    finally:
        if bar:
            bar.close()
    if args.json:
        _print_json(result.to_dict())
    else:
        print(f"{result.already_stored} of {result.files} files already stored, "
              f"{format_bytes(result.bytes_not_sent)} not sent")
        print(f"pushed {result.name} {result.version}  id {result.model_id}  {result.files} files  "
              f"{format_bytes(result.bytes_sent + result.bytes_not_sent)}")
    return EXIT_OK


def _is_snapshot(client, model: str, version: str | None) -> tuple[bool, dict | None]:
    """Whether ``model`` (an id, or a name and version) is a version committed as a list of files, and its
    document (None when it cannot be had: the single-file path then says what is wrong)."""
    from .errors import ModelServiceError, NotFound

    try:
        if version is None and rules.is_model_id(model):
            try:
                doc = client.get_model(model)
            except NotFound:
                doc = client.get_by_name(model)
        else:
            doc = client.get_by_name(model, version)
    except ModelServiceError:
        return False, None
    if not isinstance(doc, dict):
        return False, None
    return bool(not doc.get("file_metadata") and doc.get("files")), doc


def _pull_folder(client, args: argparse.Namespace, doc: dict | None) -> int:
    if args.cache_dir is not None:
        raise _Usage("--include/--exclude do not go with --cache-dir (the cache holds whole snapshots)")
    output = args.output
    if output is None:
        if doc is None:
            raise _Usage("-o/--output DIR is needed to pull a snapshot")
        output = f"{rules.name(doc.get('name'), 'name')}-{rules.version(doc.get('version'), 'version')}"
    bar = _progress(args, f"pull {args.model}")
    try:
        result = client.pull_folder(args.model, output, args.version, include=args.include, exclude=args.exclude,
                                    overwrite=args.force, parallel=args.parallel, limit_rate=args.limit_rate,
                                    progress=bar)
    finally:
        if bar:
            bar.close()
    if args.json:
        _print_json({**result.to_dict(), "requests": client.request_count})
    else:
        kept = f", {result.files_kept} kept from an interrupted pull" if result.files_kept else ""
        print(f"{result.path}/  {result.name} {result.version}  {result.files} files  {format_bytes(result.size)}  "
              f"sha256 verified  ({result.files_downloaded} downloaded, "
              f"{format_bytes(result.bytes_transferred)}{kept})")
    return EXIT_OK


def _pull(client, args: argparse.Namespace) -> int:
    if args.include or args.exclude:
        return _pull_folder(client, args, None)
    if args.cache_dir is None:
        snap, doc = _is_snapshot(client, args.model, args.version)
        if snap:
            return _pull_folder(client, args, doc)
    bar = _progress(args, f"pull {args.model}")
    try:
        if args.cache_dir is not None:
            if args.output is not None:
                raise _Usage("--cache-dir and -o/--output do not go together (the file stays in the cache)")
            name, version = args.model, args.version
            if version is None and rules.is_model_id(name):
                try:
                    doc = client.get_model(name)
                except Exception:
                    doc = None  # not an id after all: a name made of 24 hex digits
                if doc is not None:
                    name, version = rules.name(doc.get("name"), "name"), rules.version(doc.get("version"), "version")
            result = client.fetch_result(name, version, args.cache_dir, parallel=args.parallel,
                                         limit_rate=args.limit_rate, progress=bar)
        else:
            result = client.download(args.model, args.output or ".", args.version, parallel=args.parallel,
                                     limit_rate=args.limit_rate, progress=bar, resume=not args.no_resume,
                                     overwrite=args.force, durable=args.fsync)
    finally:
        if bar:
            bar.close()
    if args.json:
        _print_json({**result.to_dict(), "requests": client.request_count})
    else:
        how = "cached copy is current" if result.cached else (
            f"{format_bytes(result.bytes_transferred / result.seconds) if result.seconds else '-'}/s"
            + (f", resumed at {format_bytes(result.resumed_bytes)}" if result.resumed_bytes else "")
            + (f", {result.parallel} ranges" if result.parallel > 1 else ""))
        what = f"{result.files} files  " if result.files is not None else ""
        print(f"{result.path}  {result.name} {result.version}  {what}{format_bytes(result.size)}  "
              f"sha256 verified  ({how})")
    return EXIT_OK


def _list(client, args: argparse.Namespace) -> int:
    page = client.list_models(algorithm=args.algorithm, status=args.status, tags=args.tag or None, q=args.query,
                              min_accuracy=args.min_accuracy, created_by=args.created_by, sort=args.sort,
                              page=args.page, limit=args.limit)
    if args.json:
        _print_json(page)
        return EXIT_OK
    if page["models"]:
        print(_table(_MODEL_HEADERS, _model_rows(page["models"])))
    p = page["pagination"]
    print(f"{p['total']} model(s); page {p['page']} of {max(p['pages'], 1)}", file=sys.stderr)
    return EXIT_OK


def _show(client, args: argparse.Namespace) -> int:
    from .errors import NotFound

    if args.version is None and rules.is_model_id(args.model):
        try:
            doc = client.get_model(args.model)
        except NotFound:
            try:
                doc = client.get_by_name(args.model)
            except NotFound as e:
                raise NotFound(f"no model with id or name {args.model}", status=404, code=e.code) from None
    else:
        doc = client.get_by_name(args.model, args.version)
    if args.json:
        _print_json(doc)
        return EXIT_OK
    fm = doc.get("file_metadata")
    lines = [
        ("id", doc["id"]), ("name", doc["name"]), ("version", doc["version"]),
        ("algorithm", doc["algorithm"]), ("status", doc["status"]),
        ("description", doc.get("description") or "-"),
        ("metrics", _metrics(doc.get("metrics"))),
        ("hyperparameters", json.dumps(doc.get("hyperparameters") or {})),
        ("dataset", json.dumps(doc.get("dataset_info") or {})),
        ("tags", ", ".join(doc.get("tags") or []) or "-"),
        ("parent", doc.get("parent_model_id") or "-"),
        ("created", f"{doc['created_at']}" + (f" by {doc['created_by']}" if doc.get("created_by") else "")),
        ("updated", doc["updated_at"]),
        ("downloads", str(doc.get("download_count", 0))),
        ("file", f"{fm['filename']}  {format_bytes(fm['size_bytes'])}  {fm['checksum']}" if fm else "(none)"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        print(f"{k + ':':<{width + 1}}  {v}")
    return EXIT_OK


def _versions(client, args: argparse.Namespace) -> int:
    versions = client.list_versions(args.name)
    if args.json:
        _print_json({"name": args.name, "versions": versions})
        return EXIT_OK
    print(_table(_MODEL_HEADERS, _model_rows(versions)))
    return EXIT_OK


def _rm(client, args: argparse.Namespace) -> int:
    answer = client.delete_model(args.id)
    if args.json:
        _print_json(answer)
    else:
        print(f"deleted {answer.get('deleted_id', args.id)}")
    return EXIT_OK


def _stats(client, args: argparse.Namespace) -> int:
    from .errors import BadRequest, NotFound

    try:
        stats = client.statistics()
    except (NotFound, BadRequest) as e:
        # Services without the endpoint answer 404 (or, where /{id} catches the
        # path, 400 invalid_id): either way there are no statistics to show.
        if isinstance(e, NotFound) or e.code == "invalid_id":
            _fail(args, f"this Model Service ({client.base_url}) does not provide statistics: "
                        f"GET /api/v1/models/statistics answered {e.status} ({e.code}); it needs a newer service")
            return EXIT_ERROR
        raise
    if args.json:
        _print_json(stats)
        return EXIT_OK
    for key, value in stats.items():
        shown = json.dumps(value, indent=2, default=str) if isinstance(value, (dict, list)) else value
        print(f"{key}: {shown}")
    return EXIT_OK


# -- registration ------------------------------------------------------------


def add_client_commands(subparsers, prog: str = "model-service") -> None:
    """Register push, pull, list, show, versions, rm and stats on an argparse subparsers object.

    ``prog`` is the command's name in error messages.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service's URL (default: $MODEL_SERVICE_URL, else http://localhost:8084)")
    common.add_argument("--api-key", help="API key sent as X-API-Key (default: $MODEL_SERVICE_API_KEY)")
    common.add_argument("--json", action="store_true", help="print JSON on stdout, for scripts")
    common.add_argument("--retries", type=_retries, metavar="N",
                        help="retries of a failed request: refused connection, reset, 429, 5xx (default 4)")

    def add(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=_command(fn), prog=prog)
        return p

    p = add("push", _push, "register a model and upload its file, or its folder as a snapshot")
    p.add_argument("path", help="the model file, or a folder: every file under it, only new content sent")
    p.add_argument("--name", required=True, help="model name (A-Z, a-z, 0-9, '_', '.', '-')")
    p.add_argument("--algorithm", required=True)
    p.add_argument("--metric", action="append", type=_metric, default=[], metavar="K=V",
                   help="a metric, e.g. accuracy=0.93 (repeatable)")
    p.add_argument("--param", action="append", type=_param, default=[], metavar="K=V",
                   help="a hyperparameter, e.g. n_estimators=150 (repeatable; JSON values)")
    p.add_argument("--tag", action="append", default=[], help="a tag (repeatable)")
    p.add_argument("--version", type=_version, help="ask for this version number (vX.Y)")
    p.add_argument("--breaking", action="store_true", help="bump the major version (v2.0 after v1.x)")
    p.add_argument("--description")
    p.add_argument("--created-by")
    p.add_argument("--format", help="file format (default: the file name's extension)")
    p.add_argument("--session-threshold", type=_byte_size, metavar="SIZE",
                   help="files larger than SIZE go through a resumable upload session: a push interrupted and "
                        "run again sends only the rest (default: $MODEL_SERVICE_SESSION_THRESHOLD, else 64MiB)")
    p.add_argument("--chunk-size", type=_chunk_size, metavar="SIZE",
                   help="bytes per request of an upload session, 16MiB to 64MiB (default 32MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    p = add("pull", _pull, "download a model's file, or a snapshot's files into a folder, verified against "
                           "their sha256")
    p.add_argument("model", metavar="ID_OR_NAME", help="model id, or a name (its latest version)")
    p.add_argument("-o", "--output", help="file or directory to write (default: the server's file name here, "
                   "or NAME-VERSION if that is hidden or not a plain file name); for a snapshot, the folder "
                   "to create (default NAME-VERSION), which appears complete or not at all")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="a snapshot: only files whose path matches GLOB ('*' crosses '/'; repeatable)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="a snapshot: not the files whose path matches GLOB (repeatable)")
    p.add_argument("--force", action="store_true", help="replace the file or folder if it exists "
                   "(else it is left alone)")
    p.add_argument("--version", type=_version, help="this version of the name rather than the latest")
    p.add_argument("--parallel", type=_positive_int, metavar="N",
                   help="fetch in N ranges at once (default: 4 for files over 64 MB, else 1)")
    p.add_argument("--limit-rate", type=parse_rate, metavar="RATE", help="at most RATE bytes/s, e.g. 500k, 50M")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="keep the file in this cache and revalidate it (prints the cached path)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming a partial download")
    p.add_argument("--fsync", action="store_true", help="sync the file to disk before it appears, so that it "
                   "survives a power loss complete (a cache, --cache-dir, always is)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    p = add("list", _list, "list models (a table)")
    p.add_argument("--algorithm")
    p.add_argument("--status", choices=("active", "deprecated", "archived"))
    p.add_argument("--tag", action="append", help="having this tag (repeatable: any of them)")
    p.add_argument("-q", "--query", help="text to look for in name, description and tags")
    p.add_argument("--min-accuracy", type=float)
    p.add_argument("--created-by")
    p.add_argument("--sort", help="created_at, name, download_count or metrics.<name>; descending as --sort=-FIELD "
                        "(default: --sort=-created_at)")
    p.add_argument("--page", type=int)
    p.add_argument("--limit", type=int)

    p = add("show", _show, "show a model's metadata")
    p.add_argument("model", metavar="ID_OR_NAME", help="model id, or a name (its latest version)")
    p.add_argument("--version", type=_version)

    p = add("versions", _versions, "list every version of a name, newest first")
    p.add_argument("name")

    p = add("rm", _rm, "delete a model (and its file, unless another model shares it)")
    p.add_argument("id")

    add("stats", _stats, "registry statistics (GET /api/v1/models/statistics)")


def main(argv: list[str] | None = None) -> int:
    """``tensorfleet-client``: the client commands alone."""
    parser = argparse.ArgumentParser(prog="tensorfleet-client",
                                     description="Client for the TensorFleet Model Service")
    add_client_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), parser.prog)
    args = parser.parse_args(argv)
    return args.func(args)
