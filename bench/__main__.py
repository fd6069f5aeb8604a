"""``python -m bench``: load tests of the Model Service, side by side with nginx and the raw driver.

Starts everything on 127.0.0.1 (the service with either backend, nginx, the
FerretDB test server unless MONGODB_URL is set), creates random model files,
uploads them through the API and runs the scenarios from a separate client
process. Results go to bench/results/<UTC timestamp>/ (results.json,
summary.md, PNG charts). Exit status 1 if any request failed or any body did
not verify; speeds never fail a run.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

DEFAULTS = {"sizes": "256MB,1GB", "concurrency": "1,4,16,64", "workers": "1,2", "chunk_sizes": "255KiB,1MiB,4MiB",
            "duration": 5.0, "meta_models": 10_000, "rounds": 3}
# --quick checks that every scenario runs and reports (never a figure), so the least that does: one
# chunk size other than the default (which every other scenario uses), two concurrency levels, 100 models.
QUICK = {"sizes": "8MB,24MB", "concurrency": "1,4", "workers": "1,2", "chunk_sizes": "1MiB",
         "duration": 1.0, "meta_models": 100, "rounds": 1}
FERRETDB_SIZES = "16MB,64MB"
QUICK_FERRETDB_SIZES = "4MB,12MB"


def _sizes(text: str) -> list[int]:
    from app.config import parse_size

    try:
        values = [parse_size(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not values or min(values) < 2 * 1024 * 1024:
        raise argparse.ArgumentTypeError("sizes must be at least 2 MiB each")
    return values


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("values must be at least 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    from .run import SCENARIOS

    p = argparse.ArgumentParser(
        prog="python -m bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
        epilog=(
            "scenarios: single (single-stream download of each size), concurrent (the smaller file at each\n"
            "concurrency, per worker count), ranges (random 1 MiB ranges of the larger file from 4 connections;\n"
            "TTFB at offset 0 vs 90%), segmented (the larger file in 8 parallel ranges, sha256-verified),\n"
            "upload (1 and 4 concurrent), metadata (list/search/get against a registry, wrk), chunksize\n"
            "(mongodb: GRIDFS_CHUNK_SIZE compared), client (embedded: single stream via aiohttp's client),\n"
            "replicas (mongodb: 1, 2, 3 service processes behind nginx; ratios to one replica), floors\n"
            "(embedded: get-by-id, listing and 16 KB downloads against a bare aiohttp app, bench/floor.py,\n"
            "and nginx; time to first byte of one download).\n\n"
            "peers: nginx (sendfile) for the embedded backend; raw PyMongo async GridFS on the same database\n"
            "for the mongodb backend (on the FerretDB test server only ratios are reported).\n\n"
            "examples:\n"
            "  python -m bench --quick                      # smoke test, < 2 minutes, both backends\n"
            "  python -m bench --backend embedded           # the full embedded run (256 MB and 1 GB files)\n"
            "  python -m bench --backend mongodb --sizes 16MB,64MB\n"
            "  MONGODB_URL=mongodb://host:27017 python -m bench --backend mongodb"),
    )
    p.add_argument("--backend", choices=["embedded", "mongodb", "both"], default="both",
                   help="which storage backend(s) to measure (default: both)")
    p.add_argument("--sizes", type=_sizes, metavar="LIST",
                   help=f"file sizes, comma-separated; the smallest is the concurrency/upload file, the largest the "
                        f"ranges/segmented one (default {DEFAULTS['sizes']}; on the FerretDB test server the mongodb "
                        f"backend uses {FERRETDB_SIZES} unless --sizes or --mongo-sizes is given)")
    p.add_argument("--mongo-sizes", type=_sizes, metavar="LIST",
                   help="file sizes for the mongodb backend only (overrides --sizes there)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help=f"rounds per measurement, ours and the peer interleaved; figures are medians "
                        f"(default {DEFAULTS['rounds']}, minimum 3 except with --quick)")
    p.add_argument("--workers", type=_ints, metavar="N[,N...]",
                   help="service processes sharing the port (WORKERS, SO_REUSEPORT); a list measures each for the "
                        "concurrent and metadata scenarios and uses the first elsewhere; nginx runs with the same "
                        f"number of worker processes (default {DEFAULTS['workers']})")
    p.add_argument("--concurrency", type=_ints, metavar="LIST",
                   help=f"client counts for the concurrent scenario (default {DEFAULTS['concurrency']})")
    p.add_argument("--chunk-sizes", type=_chunk_sizes, metavar="LIST",
                   help=f"GRIDFS_CHUNK_SIZE values compared by the chunksize scenario (default "
                        f"{DEFAULTS['chunk_sizes']})")
    p.add_argument("--scenarios", metavar="LIST", default=",".join(SCENARIOS),
                   help=f"which scenarios to run (default all: {','.join(SCENARIOS)})")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help=f"length of each timed ranges/metadata measurement (default {DEFAULTS['duration']:g})")
    p.add_argument("--models", type=int, dest="meta_models", metavar="N",
                   help=f"registry size for the metadata scenario (default {DEFAULTS['meta_models']}; 1000 for "
                        "mongodb on the FerretDB test server, where each listing scans the collection in memory)")
    p.add_argument("--mongo-range-size", type=lambda t: _sizes(t)[0], metavar="SIZE",
                   help="file size for the mongodb ranges scenario (default: the smallest size on the FerretDB test "
                        "server, the largest on a real MongoDB)")
    p.add_argument("--client", choices=["raw", "aiohttp"], default="raw",
                   help="download client: raw (lean asyncio client, default) or aiohttp")
    p.add_argument("--verify", choices=["bytes", "sha256"],
                   help="download verification: bytes (memcmp against the source file, default) or sha256 "
                        "(hash every body; --quick's default)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test in under 2 minutes: sizes {QUICK['sizes']} ({QUICK_FERRETDB_SIZES} for mongodb "
                        "on the "
                        f"FerretDB test server), concurrency {QUICK['concurrency']}, "
                        f"1 round, {QUICK['meta_models']} models, sha256 verification; fails on any error or "
                        "unverified body, never on a speed")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="results directory (default bench/results/<UTC timestamp>)")
    p.add_argument("--no-pin", dest="pin", action="store_false",
                   help="do not pin 1-worker servers to CPU 0 and the client to the other CPUs (pinning makes "
                        "single-process figures repeatable: each side gets its own core)")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work directory (data, nginx logs)")
    return p


def _chunk_sizes(text: str) -> list[int]:
    from app.config import parse_size

    try:
        return [parse_size(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    from . import run
    from .run import SCENARIOS, Options

    parser = build_parser()
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    rounds = args.rounds if args.rounds is not None else base["rounds"]
    if rounds < 3 and not args.quick:
        parser.error("--rounds must be at least 3 (medians of fewer say little); --quick may use fewer")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    sizes = args.sizes or _sizes(base["sizes"])
    if args.mongo_sizes:
        mongo_sizes = args.mongo_sizes
    elif args.sizes:
        mongo_sizes = None
    else:
        import os

        mongo_sizes = None if os.environ.get("MONGODB_URL") else _sizes(
            QUICK_FERRETDB_SIZES if args.quick else FERRETDB_SIZES)
    backends = ["embedded", "mongodb"] if args.backend == "both" else [args.backend]
    repo = Path(__file__).resolve().parents[1]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (args.out or repo / "bench" / "results" / stamp).resolve()
    opts = Options(
        backends=backends,
        sizes=sizes,
        mongo_sizes=mongo_sizes,
        rounds=rounds,
        workers=args.workers or _ints(base["workers"]),
        chunk_sizes=args.chunk_sizes or _chunk_sizes(base["chunk_sizes"]),
        concurrency=args.concurrency or _ints(base["concurrency"]),
        scenarios=scenarios,
        out=out,
        quick=args.quick,
        client=args.client,
        verify=args.verify or ("sha256" if args.quick else "bytes"),
        duration=args.duration if args.duration is not None else base["duration"],
        meta_models=args.meta_models or base["meta_models"],
        meta_models_explicit=args.meta_models is not None,
        mongo_range_size=args.mongo_range_size,
        keep_work=args.keep_work,
        pin=args.pin,
    )
    return run.run(opts)


if __name__ == "__main__":
    sys.exit(main())
