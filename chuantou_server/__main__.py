"""``python -m chuantou_server``: run the relay in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from common import __version__
from common.errors import ChuantouError

from .server import Server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chuantou_server",
        description="Run the chuantou relay in the foreground.",
        epilog="example: python -m chuantou_server --port 8200",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8200, help="TCP and UDP port (default 8200)")
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0,
                        help="seconds of silence before a client is dropped (default 60)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--version", action="version", version=f"chuantou {__version__}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threading.stack_size(512 * 1024)  # thousands of pump threads; keep their stacks modest
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = Server(host=args.host, port=args.port, heartbeat_timeout=args.heartbeat_timeout)
    try:
        server.start()
    except ChuantouError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"chuantou relay listening on {args.host}:{server.port}; clients use --server ws://<host>:{server.port}",
          flush=True)
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
