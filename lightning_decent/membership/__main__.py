"""``python -m lightning_decent.membership serve --port 29400``: serve an elastic run's membership store."""

from __future__ import annotations

import argparse
import sys

from lightning_decent.membership.store import serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_decent.membership", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("serve", help="serve the membership store of an elastic run")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--run-id", default="lightning-decent", help="the run's ElasticOptions.run_id")
    server.add_argument(
        "--idle-seconds", type=float, default=60.0, help="exit once no member sent a heartbeat for this long"
    )
    args = parser.parse_args(argv)
    return serve(args.host, args.port, args.run_id, args.idle_seconds)


if __name__ == "__main__":
    sys.exit(main())
