"""Network namespaces for the direct-path tests: a relay on a "public" network and two clients,
each behind its own NAT router (iptables MASQUERADE; ``--random-fully`` makes one symmetric).

Layout (a /28 from 10.202.0.0/15 chosen by the test's pid)::

    ns a (client A, the user) -- ns ra (NAT) -- ns p (relay, "the internet") -- ns rb (NAT) -- ns b (client B, echo)
      .10                .9  .2                  .1  .5                    .6  .13               .14

The routers drop what arrives unasked on their public side (as home routers do), so a punch
packet that arrives before the router's own outbound mapping leaves no stale connection
behind. The public namespace has no route to either private network.

The relay and clients run in processes of their own (tests/netns_support.NsProcess) that print
one JSON line when ready and answer command lines with one JSON line each. Run as a script,
this file is those processes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns_support import IP_TIMEOUT, READY_TIMEOUT, Link, NsProcess, sh  # noqa: E402


def _subnet(pid: int) -> tuple[str, int]:
    base = (pid % 4096) * 16
    return f"10.{202 + (base >> 16)}.{(base >> 8) & 255}", base & 255


class NatTopology:
    def __init__(self, log_dir: Path, symmetric_a: bool = False):
        pid = os.getpid()
        self.log_dir = log_dir
        self.symmetric_a = symmetric_a
        self.ns = {name: f"ct-{pid}-{name}" for name in ("p", "ra", "rb", "a", "b")}
        prefix, base = _subnet(pid)
        ip = lambda n: f"{prefix}.{base + n}"  # noqa: E731
        n = self.ns
        self.links = [  # (one end, other end)
            (Link(f"ct{pid}pa", n["p"], ip(1)), Link(f"ct{pid}ap", n["ra"], ip(2))),
            (Link(f"ct{pid}pb", n["p"], ip(5)), Link(f"ct{pid}bp", n["rb"], ip(6))),
            (Link(f"ct{pid}ra", n["ra"], ip(9)), Link(f"ct{pid}ar", n["a"], ip(10))),
            (Link(f"ct{pid}rb", n["rb"], ip(13)), Link(f"ct{pid}br", n["b"], ip(14))),
        ]
        # Each client reaches the relay at the address on its side: a relay bound to 0.0.0.0
        # answers UDP from the address of the interface it sends on, and a NAT only lets back
        # in what comes from the address it sent to.
        self.relay_ip = {"a": ip(1), "b": ip(5)}
        self.nat_ip = {"a": ip(2), "b": ip(6)}  # each NAT's public address (what the other side punches to)
        self._cuts: list[tuple[str, ...]] = []
        self.routes = {n["ra"]: ip(1), n["rb"]: ip(5), n["a"]: ip(9), n["b"]: ip(13)}
        self.nat = {n["ra"]: self.links[0][1].dev, n["rb"]: self.links[1][1].dev}  # router -> public device
        self._made: list[str] = []
        self._procs: list[NsProcess] = []

    def create(self) -> "NatTopology":
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=IP_TIMEOUT)
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        for one, other in self.links:
            sh("ip", "link", "add", one.dev, "type", "veth", "peer", "name", other.dev)
            for end in (one, other):
                sh("ip", "link", "set", end.dev, "netns", end.netns)
                sh(*end.cmd("ip", "addr", "add", f"{end.addr}/30", "dev", end.dev))
                sh(*end.cmd("ip", "link", "set", end.dev, "up"))
        for ns, gateway in self.routes.items():
            sh("ip", "netns", "exec", ns, "ip", "route", "add", "default", "via", gateway)
        for ns in (self.ns["p"], self.ns["ra"], self.ns["rb"]):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for router, public in self.nat.items():
            masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", public, "-j", "MASQUERADE"]
            if self.symmetric_a and router == self.ns["ra"]:
                masquerade.append("--random-fully")  # a new public port for every destination
            sh("ip", "netns", "exec", router, *masquerade)
            sh("ip", "netns", "exec", router, "iptables", "-A", "INPUT", "-i", public, "-j", "DROP")
        return self

    def destroy(self) -> None:
        for proc in self._procs:
            proc.close()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=IP_TIMEOUT)
        self._made.clear()

    def cut_between_nats(self) -> None:
        """Drop, on the public network, what one NAT sends to the other (the relay still reaches
        both): a direct path between them dies mid-run, silently, as behind a failed middlebox."""
        a, b = self.nat_ip["a"], self.nat_ip["b"]
        for src, dst in ((a, b), (b, a)):
            rule = ("FORWARD", "-s", src, "-d", dst, "-j", "DROP")
            sh("ip", "netns", "exec", self.ns["p"], "iptables", "-I", *rule)
            self._cuts.append(rule)

    def join_nats(self) -> None:
        while self._cuts:
            sh("ip", "netns", "exec", self.ns["p"], "iptables", "-D", *self._cuts.pop())

    def run_in(self, where: str, *argv: str, timeout: float = 20.0) -> str:
        """A one-shot Python script of tests/ in a namespace; its stdout (it must succeed)."""
        result = subprocess.run(["ip", "netns", "exec", self.ns[where], sys.executable, *argv],
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                cwd=Path(__file__).resolve().parent.parent)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout

    def start(self, where: str, role: str, *args) -> NsProcess:
        proc = NsProcess(self.ns[where], role, [str(a) for a in args],
                         self.log_dir / f"{role}-{len(self._procs)}.log", __file__)
        self._procs.append(proc)
        proc.wait_ready()
        return proc


# --- the processes inside the namespaces ---------------------------------------------------------

def _serve_commands(handlers: dict) -> None:
    for line in sys.stdin:
        name, *args = line.split()
        if name in handlers:
            print(json.dumps(handlers[name](*args)), flush=True)


def _run_relay(args) -> None:
    from chuantou_server import Server

    server = Server(host="0.0.0.0", port=0, token=args.token, probe_port=0).start()
    try:
        print(json.dumps({"port": server.port, "probePort": server.probe_port}), flush=True)
        _serve_commands({"status": server.status})
    finally:
        server.stop()


def _client_status(client) -> dict:
    return {"connected": client.connected, "direct": client.status()["direct"], "connections": client.connections(),
            "seal": client.seal_counts(), "peers": _direct_peers(client)}


def _direct_peers(client) -> list[str]:
    """Where each live UDP flow's direct path leads (the peer's NAT mapping, as punched)."""
    from common.direct import format_candidate

    peers = []
    for record in client.sessions.records():
        puncher = getattr(record.handle, "puncher", None)
        if puncher is not None and puncher.direct is not None:
            peers.append(format_candidate(*puncher.direct))
    return peers


def _client(args, client_id: str):
    from chuantou_client import Client

    return Client(args.url, client_id, token=args.token, path=args.path, direct_keepalive=args.direct_keepalive,
                  direct_retry=args.direct_retry).start(timeout=READY_TIMEOUT)


def _run_target(args) -> None:
    from helpers import UdpEchoService

    echo = UdpEchoService().start()
    client = None
    try:
        client = _client(args, "B")
        print(json.dumps({"servicePort": echo.port}), flush=True)
        _serve_commands({"status": lambda: _client_status(client)})
    finally:
        if client is not None:
            client.stop()
        echo.stop()


def _run_gateway(args) -> None:
    client = None
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one user address kept across commands
    held.bind(("127.0.0.1", 0))
    try:
        client = _client(args, args.id)
        proxy = client.create_proxy(0, "B", args.service_port, protocol="udp")
        print(json.dumps({"proxyPort": proxy.local_port}), flush=True)
        exchange = lambda sock, count: {**_exchange(proxy.local_port, int(count), sock),  # noqa: E731
                                        **_client_status(client)}
        _serve_commands({"status": lambda: _client_status(client),
                         "run": lambda count: exchange(None, count),
                         "held": lambda count: exchange(held, count),
                         "drain": lambda seconds: {"received": _drain(held, float(seconds))}})
    finally:
        held.close()
        if client is not None:
            client.stop()


def _drain(sock: socket.socket, seconds: float) -> int:
    """How many datagrams reach the user's socket within ``seconds`` (it asked for none)."""
    count = 0
    deadline = time.monotonic() + seconds
    while True:
        sock.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            sock.recv(65535)
        except (socket.timeout, BlockingIOError):
            break
        count += 1
    return count


def _exchange(port: int, count: int, held: socket.socket | None = None, size: int = 512, window: int = 50) -> dict:
    """Send ``count`` distinct datagrams through the proxy (``window`` at a time, resending what
    did not come back) and count the echoes that came back intact; from a new user address (a
    new flow), or from ``held`` (the flow of that address, if it still lives)."""
    payloads = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]
    intact: set[int] = set()
    corrupt = 0
    with contextlib.nullcontext(held) if held is not None else socket.socket(socket.AF_INET,
                                                                              socket.SOCK_DGRAM) as sock:
        if held is None:
            sock.bind(("127.0.0.1", 0))
        else:
            _drain(sock, 0.0)  # late echoes of an earlier exchange's resends
        began = time.monotonic()
        first_echo = None
        for start in range(0, count, window):
            batch = range(start, min(count, start + window))
            for attempt in range(4):
                for i in batch:
                    if i not in intact:
                        sock.sendto(payloads[i], ("127.0.0.1", port))
                deadline = time.monotonic() + (5.0 if first_echo is None else 2.0)
                while any(i not in intact for i in batch) and (remaining := deadline - time.monotonic()) > 0:
                    sock.settimeout(remaining)
                    try:
                        data = sock.recv(65535)
                    except socket.timeout:
                        break
                    index = int.from_bytes(data[:4], "big")
                    if index < count and data == payloads[index]:
                        intact.add(index)
                        if first_echo is None:
                            first_echo = time.monotonic() - began
                    else:
                        corrupt += 1
                if all(i in intact for i in batch):
                    break
    return {"sent": count, "intact": len(intact), "corrupt": corrupt, "firstEcho": first_echo}


def main() -> None:
    import logging

    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("relay", "target", "gateway"))
    parser.add_argument("--url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--path", default="auto")
    parser.add_argument("--service-port", type=int)
    parser.add_argument("--id", default="A", help="the gateway's client ID")
    parser.add_argument("--direct-keepalive", type=float, default=2.0)
    parser.add_argument("--direct-retry", type=float, default=5.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(asctime)s.%(msecs)03d %(threadName)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    {"relay": _run_relay, "target": _run_target, "gateway": _run_gateway}[args.role](args)


if __name__ == "__main__":
    main()
