"""The ``model-service`` command (also ``python -m app``)."""

from __future__ import annotations

import argparse
import sys

from .client.cli import add_client_commands
from . import logs
from .config import ConfigError, Settings
from .maintenance import add_maintenance_commands
from .storage import StorageUnavailable


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as e:
        print(f"model-service: configuration error: {e}", file=sys.stderr)
        return 2
    if args.port is not None:
        settings = _replace(settings, port=args.port)
    if args.host is not None:
        settings = _replace(settings, host=args.host)
    if args.workers is not None:
        if not 1 <= args.workers <= 64:
            print("model-service: --workers must be between 1 and 64", file=sys.stderr)
            return 2
        settings = _replace(settings, workers=args.workers)
    logs.configure(settings.log_level, settings.log_format)
    from .server import serve

    try:
        serve(settings)
    except StorageUnavailable as e:
        print(f"model-service: cannot start: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"model-service: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _replace(settings: Settings, **changes) -> Settings:
    from dataclasses import replace

    return replace(settings, **changes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="model-service", description="TensorFleet Model Service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the HTTP service (configured by environment variables)")
    serve.add_argument("--host", help="listen address (overrides HOST)")
    serve.add_argument("--port", type=int, help="listen port (overrides PORT)")
    serve.add_argument("--workers", type=int, help="serving processes sharing the port (overrides WORKERS)")
    serve.set_defaults(func=_serve)
    add_client_commands(sub)
    add_maintenance_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
