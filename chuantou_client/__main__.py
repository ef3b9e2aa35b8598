"""``python -m chuantou_client``: run a client in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from common import __version__
from common.errors import ChuantouError

from .client import DEFAULT_SERVER_URL, Client


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chuantou_client",
        description="Run a chuantou client in the foreground.",
        epilog="example: python -m chuantou_client --server ws://127.0.0.1:8200 --client-id laptop",
    )
    parser.add_argument("--server", default=os.environ.get("CHUANTOU_SERVER", DEFAULT_SERVER_URL),
                        help=f"relay URL (default $CHUANTOU_SERVER or {DEFAULT_SERVER_URL})")
    parser.add_argument("--client-id", help="this client's ID (default: generated)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"chuantou {__version__}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.stack_size(512 * 1024)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        client = Client(args.server, args.client_id).start()
    except ChuantouError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"client {client.client_id} registered with {args.server}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
