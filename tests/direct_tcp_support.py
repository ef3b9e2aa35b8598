"""The processes of the TCP direct-path tests, inside direct_support.NatTopology's namespaces:
a relay that reports the TCP bytes it pumped (and those its clients said went direct), a target B with a TCP echo service, and a
gateway A whose ``tcp MIB`` command sends that many MiB through a TCP proxy to the echo and
reads as many back, at once (no half-close), and reports both sha256 digests.

Run as a script, this file is those processes (one JSON line when ready, one per command).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns_support import READY_TIMEOUT, NsProcess  # noqa: E402

CHUNK = 1 << 20


def start(topo, where: str, role: str, *args) -> NsProcess:
    """Start one of this file's roles in ``topo``'s namespace ``where`` (torn down with it)."""
    proc = NsProcess(topo.ns[where], role, [str(a) for a in args],
                     topo.log_dir / f"tcp-{role}-{len(topo._procs)}.log", __file__)
    topo._procs.append(proc)
    proc.wait_ready()
    return proc


def _serve_commands(handlers: dict) -> None:
    for line in sys.stdin:
        name, *args = line.split()
        if name in handlers:
            print(json.dumps(handlers[name](*args)), flush=True)


def _run_relay(args) -> None:
    from chuantou_server import Server

    server = Server(host="0.0.0.0", port=0, token=args.token, probe_port=0).start()

    def traffic() -> dict:
        counts = server.traffic.bytes_by_direction()
        direct = server.traffic.direct_by_direction()  # what the clients reported (direct_claims.py)
        return {"tcpBytesRelayed": sum(n for (protocol, _), n in counts.items() if protocol == "tcp"),
                "sessions": len(server.sessions),
                "tcpDirectReported": [direct.get(("tcp", 0), 0), direct.get(("tcp", 1), 0)]}

    try:
        print(json.dumps({"port": server.port}), flush=True)
        _serve_commands({"traffic": traffic})
    finally:
        server.stop()


def _client_status(client) -> dict:
    return {"connected": client.connected, "direct": client.status()["direct"], "connections": client.connections()}


def _run_target(args) -> None:
    from chuantou_client import Client
    from helpers import TcpService, echo_handler

    echo = TcpService(echo_handler, "svc-echo").start()
    client = None
    try:
        client = Client(args.url, "B", token=args.token, path=args.path, **_tuning(args)).start(timeout=READY_TIMEOUT)
        print(json.dumps({"servicePort": echo.port}), flush=True)
        _serve_commands({"status": lambda: _client_status(client)})
    finally:
        if client is not None:
            client.stop()
        echo.stop()


def _run_gateway(args) -> None:
    from chuantou_client import Client

    client = None
    held: list[Chatter] = []
    try:
        client = Client(args.url, args.id, token=args.token, path=args.path, **_tuning(args)).start(
            timeout=READY_TIMEOUT)
        proxy = client.create_proxy(0, "B", args.service_port, protocol="tcp")
        print(json.dumps({"proxyPort": proxy.local_port}), flush=True)

        def hold(mode: str = "chatty") -> dict:
            held.append(Chatter(proxy.local_port, idle=mode == "idle"))
            return {**held[-1].state(), **_client_status(client)}

        _serve_commands({"status": lambda: _client_status(client),
                         "tcp": lambda mib: {**_transfer(proxy.local_port, int(mib)), **_client_status(client)},
                         "hold": hold, "held": lambda: [chatter.state() for chatter in held]})
    finally:
        for chatter in held:
            chatter.close()
        if client is not None:
            client.stop()


def _tuning(args) -> dict:
    return {name: value for name, value in (("direct_keepalive", args.direct_keepalive),
                                            ("direct_retry", args.direct_retry)) if value is not None}


class Chatter:
    """A user's connection that stays open and talks through the proxy: 1 KiB to the echo and
    back, again and again (``idle``: once, then it only waits to read), until the connection
    ends; how it ended ("eof": a clean end, which a cut path must never look like; "reset" or
    "error: ..."), and when."""

    def __init__(self, port: int, idle: bool = False):
        self.idle = idle
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30.0)
        self.rounds = 0
        self.ended: str | None = None
        self.ended_at: float | None = None
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._talk, name="svc-chatter", daemon=True)
        self._thread.start()
        self._first.wait(30.0)  # one round trip: the session is up (and its path chosen)

    def _talk(self) -> None:
        block = os.urandom(1024)
        try:
            while True:
                self.sock.sendall(block)
                got = b""
                while len(got) < len(block):
                    data = self.sock.recv(len(block) - len(got))
                    if not data:
                        self._end("eof")
                        return
                    got += data
                if got != block:
                    self._end("corrupt")
                    return
                self.rounds += 1
                self._first.set()
                if self.idle:
                    self._end("eof" if not self.sock.recv(1) else "unasked data")
                    return
                time.sleep(0.05)  # (pacing a user's chatter, not synchronisation)
        except ConnectionResetError:
            self._end("reset")
        except OSError as exc:
            self._end(f"error: {exc}")

    def _end(self, how: str) -> None:
        self.ended, self.ended_at = how, time.monotonic()
        self._first.set()

    def state(self) -> dict:
        return {"rounds": self.rounds, "ended": self.ended, "endedAt": self.ended_at, "now": time.monotonic()}

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5.0)


def _transfer(port: int, mib: int) -> dict:
    """Send ``mib`` MiB of random bytes through the proxy while reading the echo; digests, time
    to the first echoed byte (the session's setup as the user sees it) and the whole time."""
    sent, got = hashlib.sha256(), hashlib.sha256()
    total = mib * CHUNK
    errors: list[str] = []
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30.0) as sock:
        def send() -> None:
            try:
                for _ in range(mib):
                    block = os.urandom(CHUNK)
                    sent.update(block)
                    sock.sendall(block)
            except OSError as exc:
                errors.append(f"send: {exc}")

        sender = threading.Thread(target=send, name="svc-tcp-sender", daemon=True)
        sender.start()
        received, first = 0, None
        try:
            while received < total:
                data = sock.recv(CHUNK)
                if not data:
                    break
                if first is None:
                    first = time.monotonic() - began
                got.update(data)
                received += len(data)
        except OSError as exc:
            errors.append(f"recv: {exc}")
        sender.join(30.0)
    return {"bytes": total, "received": received, "intact": sent.hexdigest() == got.hexdigest() and received == total,
            "firstByte": first, "seconds": time.monotonic() - began, "errors": errors}


def main() -> None:
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("relay", "target", "gateway"))
    parser.add_argument("--url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--path", default="auto")
    parser.add_argument("--service-port", type=int)
    parser.add_argument("--id", default="A", help="the gateway's client ID")
    parser.add_argument("--direct-keepalive", type=float)
    parser.add_argument("--direct-retry", type=float)
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(threadName)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    {"relay": _run_relay, "target": _run_target, "gateway": _run_gateway}[args.role](args)


if __name__ == "__main__":
    main()
