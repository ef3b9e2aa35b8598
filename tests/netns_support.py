"""Network namespaces for the dead-link tests (issue 10 item 2): a relay and a client B that
reach each other over a veth link the test can blackhole.

Layout (addresses from 10.200.0.0/15, a /29 chosen by the test's pid so parallel runs differ)::

    root namespace (the test: client A, the user)   ns ct-<pid>-r (relay)      ns ct-<pid>-b (client B, service)
        ct<pid>a0  10.x.y.1/30  <---- veth ---->  ct<pid>a1  10.x.y.2/30
                                                  ct<pid>b0  10.x.y.5/30  <---- veth ---->  ct<pid>b1  10.x.y.6/30

The relay and client B run in processes of their own (``ip netns exec NS python
tests/netns_support.py relay|target ...``) that print one JSON line when ready and then answer
``status`` lines on stdin with one JSON line each; end of stdin stops them.

Run as a script, this file is that process.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IP_TIMEOUT = 10.0  # an `ip` or `iptables` command that takes longer than this is broken
READY_TIMEOUT = 20.0  # a helper process must be up (relay listening, B registered) within this


def netns_unavailable() -> str | None:
    """Why these tests cannot run here (a reason for pytest.skip), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    return None


def sh(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def _subnet(pid: int) -> str:
    """The first three octets and the base of this run's /29 (two /30 links)."""
    base = (pid % 16384) * 8
    return f"10.{200 + (base >> 16)}.{(base >> 8) & 255}", base & 255


class Link:
    """One end of a veth pair: its device name and namespace (None: the root namespace)."""

    def __init__(self, dev: str, netns: str | None, addr: str):
        self.dev = dev
        self.netns = netns
        self.addr = addr

    def cmd(self, *args: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.netns, *args) if self.netns else args


class Topology:
    """The two namespaces, the two veth links, and the processes running inside them."""

    def __init__(self, log_dir: Path):
        pid = os.getpid()
        self.log_dir = log_dir
        self.relay_ns = f"ct-{pid}-r"
        self.b_ns = f"ct-{pid}-b"
        prefix, base = _subnet(pid)
        ip = lambda n: f"{prefix}.{base + n}"  # noqa: E731
        # link A: root <-> relay; link B: relay <-> client B
        self.a_root, self.a_relay = Link(f"ct{pid}a0", None, ip(1)), Link(f"ct{pid}a1", self.relay_ns, ip(2))
        self.b_relay, self.b_client = Link(f"ct{pid}b0", self.relay_ns, ip(5)), Link(f"ct{pid}b1", self.b_ns, ip(6))
        self._namespaces: list[str] = []
        self._procs: list[NsProcess] = []
        self._drops: list[tuple[Link, tuple[str, ...]]] = []

    # --- building and tearing down ------------------------------------------------------------

    def create(self) -> "Topology":
        for ns in (self.relay_ns, self.b_ns):
            # left over by a killed run that had our pid (its names are ours): start clean
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=IP_TIMEOUT)
            sh("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        self._veth(self.a_root, self.a_relay)
        self._veth(self.b_relay, self.b_client)
        return self

    def _veth(self, one: Link, other: Link) -> None:
        # Created in the root namespace, then each end moved where it belongs; deleting a
        # namespace deletes its ends, and with them their peers.
        sh("ip", "link", "add", one.dev, "type", "veth", "peer", "name", other.dev)
        for end in (one, other):
            if end.netns:
                sh("ip", "link", "set", end.dev, "netns", end.netns)
            sh(*end.cmd("ip", "addr", "add", f"{end.addr}/30", "dev", end.dev))
            sh(*end.cmd("ip", "link", "set", end.dev, "up"))

    def destroy(self) -> None:
        """Stop the processes, then delete the namespaces (a namespace with a live process in it
        would outlive `ip netns del`). Safe after a partial create."""
        for proc in self._procs:
            proc.close()
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=IP_TIMEOUT)
        self._namespaces.clear()
        subprocess.run(["ip", "link", "del", self.a_root.dev], capture_output=True, timeout=IP_TIMEOUT)

    # --- processes ----------------------------------------------------------------------------

    def start(self, netns: str, role: str, *args, script: str = __file__) -> "NsProcess":
        proc = NsProcess(netns, role, [str(a) for a in args], self.log_dir / f"{role}-{len(self._procs)}.log",
                         script)
        self._procs.append(proc)
        proc.wait_ready()
        return proc

    # --- blackholes ---------------------------------------------------------------------------

    def drop(self, one: Link, other: Link) -> None:
        """Blackhole a link silently: both ends drop what arrives (each still sends, so neither
        sees an error of its own, as behind a dead middlebox)."""
        for end in (one, other):
            rule = ("INPUT", "-i", end.dev, "-j", "DROP")
            sh(*end.cmd("iptables", "-I", *rule))
            self._drops.append((end, rule))

    def undrop(self) -> None:
        while self._drops:
            end, rule = self._drops.pop()
            sh(*end.cmd("iptables", "-D", *rule))

    @staticmethod
    def link_down(end: Link) -> None:
        """Take one end of a link down; its peer loses carrier and drops what it sends."""
        sh(*end.cmd("ip", "link", "set", end.dev, "down"))

    @staticmethod
    def link_up(end: Link) -> None:
        sh(*end.cmd("ip", "link", "set", end.dev, "up"))


class NsProcess:
    """A relay or client B in a namespace, driven over its stdin and stdout."""

    def __init__(self, netns: str, role: str, args: list[str], log_path: Path, script: str = __file__):
        self.role = role
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, script, role, *args], env=env, cwd=REPO,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self._buffer = b""
        self.ready: dict = {}

    def wait_ready(self) -> dict:
        self.ready = self._read_line(READY_TIMEOUT)
        return self.ready

    def status(self, timeout: float = 5.0) -> dict:
        return self.command("status", timeout)

    def command(self, line: str, timeout: float = 5.0) -> dict:
        """Send one command line; its one-line JSON answer."""
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self._read_line(timeout)

    def _read_line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the {self.role} process did not answer within {timeout:g} s; "
                                     f"its log:\n{self.log_tail()}")
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"the {self.role} process ended (rc {self.proc.wait(5)}); "
                                         f"its log:\n{self.log_tail()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """End of stdin asks it to stop; kill it if it does not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc.stdout.close()


# --- the processes inside the namespaces ---------------------------------------------------------

def _serve_commands(status) -> None:
    """Answer each `status` line on stdin with one JSON line, until stdin ends."""
    for line in sys.stdin:
        if line.strip() == "status":
            print(json.dumps(status()), flush=True)


def _run_relay(args) -> None:
    from chuantou_server import Server

    server = Server(host="0.0.0.0", port=0, token=args.token, heartbeat_timeout=args.heartbeat_timeout,
                    data_channel_timeout=args.data_channel_timeout).start()
    try:
        print(json.dumps({"port": server.port}), flush=True)
        _serve_commands(server.status)
    finally:
        server.stop()


def _service_handler(conn: socket.socket, service) -> None:
    """The service behind B. The user's first line picks what it does: ``stream`` sends until the
    connection breaks (a download); ``idle`` echoes the line and then reads whatever comes (an
    idle session, or an upload). How each connection ended is recorded in ``service.results``
    ('open', then 'eof', 'reset' or 'error: ...'), the bytes read after the line in
    ``service.received``."""
    from helpers import pattern

    with service._lock:
        index = len(service.results)
        service.results.append("open")
        service.received.append(0)
    conn.settimeout(60.0)
    try:
        mode = conn.recv(64)
        if mode.startswith(b"stream"):
            block = pattern(64 * 1024)
            while True:
                conn.sendall(block)
        conn.sendall(mode)
        while True:
            data = conn.recv(65536)
            if not data:
                break
            service.received[index] += len(data)
        service.results[index] = "eof"
    except (ConnectionResetError, BrokenPipeError):
        service.results[index] = "reset"
    except OSError as exc:
        service.results[index] = f"error: {exc}"


def _run_target(args) -> None:
    from chuantou_client import Client
    from helpers import TcpService

    service = TcpService(_service_handler, name="svc-netns")
    service.received = []
    service.start()
    client = None
    try:
        client = Client(args.url, "B", token=args.token, heartbeat_interval=args.heartbeat_interval,
                        heartbeat_timeout=args.heartbeat_timeout, data_channel_timeout=args.data_channel_timeout,
                        connect_timeout=3.0, reconnect_max_delay=1.0).start(timeout=READY_TIMEOUT)
        print(json.dumps({"servicePort": service.port}), flush=True)
        _serve_commands(lambda: {"connected": client.connected, "activeSessions": client.status()["activeSessions"],
                                 "service": list(service.results), "received": list(service.received)})
    finally:
        if client is not None:
            client.stop()
        service.stop()


def main() -> None:
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("relay", "target"))
    parser.add_argument("--url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, required=True)
    parser.add_argument("--data-channel-timeout", type=float, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(threadName)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    (_run_relay if args.role == "relay" else _run_target)(args)


if __name__ == "__main__":
    main()
