"""The ``model-service`` command (also ``python -m app``)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .maintenance import add_maintenance_commands

if TYPE_CHECKING:
    from .config import Settings


def _serve(args: argparse.Namespace) -> int:
    # The server's modules load here, not with the command line: ``model-service pull`` never needs them.
    from . import logs
    from .config import ConfigError, Settings
    from .storage import StorageUnavailable

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
    except ConfigError as e:
        print(f"model-service: configuration error: {e}", file=sys.stderr)
        return 2
    except StorageUnavailable as e:
        print(f"model-service: cannot start: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"model-service: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from . import auth

    if not auth.valid_key_name(args.name):
        print("model-service: --name must be 1-64 characters of A-Z, a-z, 0-9, '_', '.', '@', '-'", file=sys.stderr)
        return 2
    key = auth.new_key()
    print(f"API key for {args.name} ({args.scope}); shown once, store it now:")
    print(f"  {key}")
    print("Line for API_KEYS_FILE:")
    print(f"  {auth.hash_key(key)} {args.scope} {args.name}")
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
    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_sub.add_parser("create", help="make a new random key; prints it once, and its keys-file line")
    create.add_argument("--name", required=True, help="who uses the key (becomes created_by)")
    create.add_argument("--scope", required=True, choices=("read", "write", "admin"))
    create.set_defaults(func=_keys_create)
    try:
        from tensorfleet_client.cli import add_client_commands
    except ImportError:  # the server alone: serve, cleanup and gc still work
        pass
    else:
        add_client_commands(sub)
    add_maintenance_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
