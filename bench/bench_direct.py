"""The direct path beside the relay (issue 15's benchmark), in the NAT namespaces of the tests
(tests/direct_support.py: a relay on a "public" network, A and B each behind its own NAT).

    sudo python bench/bench_direct.py [--quick] [--tcp-only] [--seconds S] [--json FILE]

In one run, with one relay and one client B (a UDP echo service behind it), two gateways in A's
namespace: one that goes direct (``--path auto``) and one kept on the relay (``--path relay``).
For each: setup latency (a new user flow's first datagram to its first echo, median and max of
several flows) and UDP throughput (1,400-byte datagrams, 64 in flight, echoed: payload bytes per
second one way). Beside them, the namespaces' own throughput without chuantou, from A's
namespace to B's through both NATs (a port forward on B's NAT): the same UDP echo load against
a plain Python echo, and one TCP stream into a plain Python sink. Prints a table and the ratio
of the direct session to the plain paths (issue 15 asks >= 0.8x); asserts nothing.

TCP the same way, in the same run and namespaces: two more gateways in A's namespace (``auto``
and ``relay``) with a TCP proxy to the plain sink behind B, so a session's throughput is the
same one-way stream as the plain TCP row's; setup latency is a new connection's time to the
sink's answer (connect, 56 bytes, half-close, the count back: the session's setup plus one
round trip), beside the same against the sink through B's NAT without chuantou. Each TCP
row also gives the CPU seconds per GB (into the sink) of the sending user, A, B, the relay and
the sink over its load: on one host every process shares the same cores, so the ratio to the
plain row is a ratio of CPU per byte (see bench/README.md). ``--tcp-only``: the TCP rows alone.
Needs root, `ip` and `iptables` (as the tests); every address is inside the namespaces it makes.
Run with ``--role ...`` it is one of its own load processes inside a namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

SIZE = 1400
WINDOW = 64
LOST_AFTER = 0.2
SEQ = struct.Struct("!q")
RAW_PORT = 47001  # the plain echo / sink in B's namespace, forwarded by B's NAT
TARGET = 0.8
TOKEN = "bench-direct-token-0123456789abcdef"


# --- load processes (run inside a namespace) -----------------------------------------------------

def udp_load(host: str, port: int, seconds: float) -> dict:
    """Keep WINDOW datagrams in flight for ``seconds``; the echoed payload bytes per second."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        s.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
    s.connect((host, port))
    pad = b"\0" * (SIZE - SEQ.size)
    first = first_echo(s, pad)
    outstanding: dict[int, float] = {}
    seq = done = lost = 0
    s.settimeout(LOST_AFTER / 4)
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    while (now := clock()) < end:
        while len(outstanding) < WINDOW:
            s.send(SEQ.pack(seq) + pad)
            outstanding[seq] = now
            seq += 1
        try:
            data = s.recv(65536)
        except (socket.timeout, ConnectionRefusedError):
            data = b""
        if data:
            if outstanding.pop(SEQ.unpack_from(data)[0], None) is not None:
                done += 1
            continue
        cutoff = clock() - LOST_AFTER
        for old in [k for k, t in outstanding.items() if t < cutoff]:
            del outstanding[old]
            lost += 1
    elapsed = clock() - start
    s.close()
    return {"mb_per_s": round(done * SIZE / elapsed / 1e6, 2), "datagrams_per_s": round(done / elapsed),
            "loss_pct": round(100.0 * lost / max(1, seq), 2), "first_echo_ms": round(first * 1000, 1)}


def first_echo(s: socket.socket, pad: bytes, timeout: float = 15.0) -> float:
    """Seconds from a new flow's first datagram to its first echo (resent every 50 ms)."""
    s.settimeout(0.05)
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        try:
            s.send(SEQ.pack(-1) + pad)
            while True:
                if SEQ.unpack_from(s.recv(65536))[0] == -1:
                    took = time.perf_counter() - began
                    drain(s)
                    return took
        except (socket.timeout, ConnectionRefusedError):
            continue
    raise RuntimeError(f"no echo through port {s.getpeername()[1]} within {timeout:g} s")


def drain(s: socket.socket) -> None:
    s.settimeout(0.05)
    try:
        while True:
            s.recv(65536)
    except (socket.timeout, ConnectionRefusedError):
        pass


def setups(host: str, port: int, count: int) -> dict:
    """``count`` new flows, one after another: their setup latencies."""
    took = []
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            took.append(first_echo(s, b"\0" * 56))
    return {"setup_median_ms": round(statistics.median(took) * 1000, 1), "setup_max_ms": round(max(took) * 1000, 1)}


def tcp_load(host: str, port: int, seconds: float) -> dict:
    """One TCP stream for ``seconds``; the sink's count of bytes per second."""
    block = b"\0" * (256 * 1024)
    with socket.create_connection((host, port), timeout=10.0) as s:
        cpu = os.times()
        start = time.perf_counter()
        sent = 0
        while time.perf_counter() - start < seconds:
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        received = int(s.recv(64).decode())  # the sink says how much it read, once it read it all
        elapsed = time.perf_counter() - start
        used = sum(os.times()[:2]) - sum(cpu[:2])
    return {"mb_per_s": round(received / elapsed / 1e6, 2), "sent": sent, "received": received, "load_cpu_s": used}


def tcp_setups(host: str, port: int, count: int) -> dict:
    """``count`` new connections to the sink, one after another: connect, a few bytes, half-close,
    until the sink's count comes back (a session through chuantou is up only then)."""
    took = []
    for _ in range(count):
        began = time.perf_counter()
        with socket.create_connection((host, port), timeout=15.0) as s:
            s.sendall(b"\0" * 56)
            s.shutdown(socket.SHUT_WR)
            if s.recv(64) != b"56":
                raise RuntimeError(f"the sink behind port {port} did not count 56 bytes")
        took.append(time.perf_counter() - began)
    return {"setup_median_ms": round(statistics.median(took) * 1000, 1), "setup_max_ms": round(max(took) * 1000, 1)}


def plain_service(port: int) -> None:
    """A UDP echo and a TCP sink on ``port`` (all addresses), until stdin closes."""
    import threading

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        udp.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
    udp.bind(("0.0.0.0", port))
    udp.settimeout(0.5)
    tcp = socket.create_server(("0.0.0.0", port))
    tcp.settimeout(0.5)
    stopping = threading.Event()

    def echo() -> None:
        while not stopping.is_set():
            try:
                data, addr = udp.recvfrom(65536)
                udp.sendto(data, addr)
            except (socket.timeout, OSError):
                continue

    def sink() -> None:
        while not stopping.is_set():
            try:
                conn, _ = tcp.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(30.0)
                total = 0
                while data := conn.recv(1024 * 1024):
                    total += len(data)
                conn.sendall(str(total).encode())

    threads = [threading.Thread(target=fn, name=f"plain-{fn.__name__}") for fn in (echo, sink)]
    for t in threads:
        t.start()
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.read()
    stopping.set()
    for t in threads:
        t.join()
    udp.close()
    tcp.close()


def role_main(args) -> None:
    if args.role == "plain":
        plain_service(args.port)
        return
    work = {"udp": lambda: udp_load(args.host, args.port, args.seconds),
            "setup": lambda: setups(args.host, args.port, args.count),
            "tcp": lambda: tcp_load(args.host, args.port, args.seconds),
            "tcpsetup": lambda: tcp_setups(args.host, args.port, args.count)}[args.role]
    print(json.dumps(work()), flush=True)


# --- the run ------------------------------------------------------------------------------------

def in_ns(topo, where: str, *args, timeout: float = 120.0) -> dict:
    out = topo.run_in(where, str(Path(__file__).resolve()), *map(str, args), timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_load_with_cpu(topo, host, port, seconds: float, procs: dict) -> dict:
    """The TCP load, with CPU seconds per GB (1e9 bytes received by the sink) of the load process
    itself and of each of ``procs`` (name -> NsProcess) over the load: where the bytes cost."""
    before = {name: cpu_seconds(proc.proc.pid) for name, proc in procs.items()}
    row = in_ns(topo, "a", "--role", "tcp", "--host", host, "--port", port, "--seconds", seconds)
    gb = max(1, row.pop("received")) / 1e9
    cpu = {"load": row.pop("load_cpu_s") / gb}
    cpu.update({name: (cpu_seconds(proc.proc.pid) - before[name]) / gb for name, proc in procs.items()})
    row["cpu_s_per_gb"] = {name: round(value, 2) for name, value in cpu.items()}
    return row


def forward(topo, port: int) -> None:
    """B's NAT forwards ``port`` (UDP and TCP) to B: the plain path between the namespaces."""
    from netns_support import sh

    router, b_ip = topo.ns["rb"], topo.links[3][1].addr
    for proto in ("udp", "tcp"):
        sh("ip", "netns", "exec", router, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", topo.nat_ip["b"],
           "-p", proto, "--dport", str(port), "-j", "DNAT", "--to-destination", f"{b_ip}:{port}")


def run(seconds: float, flows: int, tcp_only: bool = False) -> dict:
    from direct_support import NatTopology
    from netns_support import NsProcess, netns_unavailable

    reason = netns_unavailable()
    if reason:
        raise SystemExit(f"bench_direct.py: {reason}")
    topo = NatTopology(Path(tempfile.mkdtemp(prefix="chuantou-direct-"))).create()
    plain = None
    try:
        relay = topo.start("p", "relay", "--token", TOKEN)
        url = lambda side: f"ws://{topo.relay_ip[side]}:{relay.ready['port']}"  # noqa: E731
        target = topo.start("b", "target", "--url", url("b"), "--token", TOKEN)
        plain = NsProcess(topo.ns["b"], "--role=plain", ["--port", str(RAW_PORT)],
                          topo.log_dir / "plain.log", str(Path(__file__).resolve()))
        plain.wait_ready()
        forward(topo, RAW_PORT)
        rows = {} if tcp_only else udp_rows(topo, url, target.ready["servicePort"], seconds, flows)
        rows.update(tcp_rows(topo, url, seconds, flows, {"B": target, "relay": relay, "sink": plain}))
        if not tcp_only:
            rows["plain UDP"] = in_ns(topo, "a", "--role", "udp", "--host", topo.nat_ip["b"], "--port", RAW_PORT,
                                      "--seconds", seconds)
        rows["plain TCP"] = tcp_load_with_cpu(topo, topo.nat_ip["b"], RAW_PORT, seconds, {"sink": plain})
        rows["plain TCP"].update(in_ns(topo, "a", "--role", "tcpsetup", "--host", topo.nat_ip["b"],
                                       "--port", RAW_PORT, "--count", flows))
        if not tcp_only:
            rows["relay"] = {"udpBytesRelayed": relay.status()["udpBytesRelayed"]}
        return rows
    finally:
        if plain is not None:
            plain.close()
        topo.destroy()


def udp_rows(topo, url, service, seconds: float, flows: int) -> dict:
    """A UDP session that goes direct beside one kept on the relay, into B's UDP echo."""
    gateways = {path: topo.start("a", "gateway", "--url", url("a"), "--token", TOKEN, "--id", f"A-{path}",
                                 "--path", path, "--service-port", service)
                for path in ("auto", "relay")}
    rows = {}
    for label, path in (("direct session", "auto"), ("relayed session", "relay")):
        port = gateways[path].ready["proxyPort"]
        row = in_ns(topo, "a", "--role", "setup", "--host", "127.0.0.1", "--port", port, "--count", flows)
        row.update(in_ns(topo, "a", "--role", "udp", "--host", "127.0.0.1", "--port", port,
                         "--seconds", seconds))
        paths = [c["path"] for c in gateways[path].status()["connections"] if c["protocol"] == "udp"]
        row["paths"] = sorted(set(paths))
        rows[label] = row
    return rows


def tcp_rows(topo, url, seconds: float, flows: int, procs: dict) -> dict:
    """A TCP session that goes direct beside one kept on the relay, into the plain sink behind B
    (``procs``: the other processes whose CPU the load is charged with, beside A's)."""
    import direct_tcp_support as tcp

    rows = {}
    for label, path in (("direct TCP", "auto"), ("relayed TCP", "relay")):
        gateway = tcp.start(topo, "a", "gateway", "--url", url("a"), "--token", TOKEN, "--id", f"A-tcp-{path}",
                            "--path", path, "--service-port", RAW_PORT)
        port = gateway.ready["proxyPort"]
        row = in_ns(topo, "a", "--role", "tcpsetup", "--host", "127.0.0.1", "--port", port, "--count", flows)
        row.update(tcp_load_with_cpu(topo, "127.0.0.1", port, seconds, {"A": gateway, **procs}))
        pair = gateway.status()["direct"]["pairs"].get("B")  # None: never tried (path relay)
        row["paths"] = ["direct" if pair and pair["last"] == "direct" and not pair["failures"] else "relay"]
        rows[label] = row
    return rows


def report(rows: dict, seconds: float) -> dict:
    print(f"direct path beside the relay, NAT namespaces, {seconds:g} s per load, "
          "load average %.2f %.2f %.2f" % os.getloadavg())
    print(f"  {'path':<16s} {'setup med':>10s} {'setup max':>10s} {'MB/s':>8s} {'dgram/s':>8s} {'loss':>6s}  carried by")
    labels = [label for label in ("direct session", "relayed session", "plain UDP", "direct TCP", "relayed TCP",
                                  "plain TCP") if label in rows]
    for label in labels:
        r = rows[label]
        med = f"{r['setup_median_ms']:.1f} ms" if "setup_median_ms" in r else "-"
        worst = f"{r['setup_max_ms']:.1f} ms" if "setup_max_ms" in r else "-"
        dgrams = str(r.get("datagrams_per_s", "-"))
        loss = f"{r['loss_pct']:.2f}%" if "loss_pct" in r else "-"
        print(f"  {label:<16s} {med:>10s} {worst:>10s} {r['mb_per_s']:>8.2f} {dgrams:>8s} {loss:>6s}  "
              f"{','.join(r.get('paths', ['no chuantou']))}")
    print("  CPU s per GB into the sink (load: the sending user; A, B: the clients; relay; sink):")
    for label in ("direct TCP", "relayed TCP", "plain TCP"):
        cpu = rows[label]["cpu_s_per_gb"]
        print(f"    {label:<14s} " + "  ".join(f"{name} {value:.2f}" for name, value in cpu.items()) +
              f"  = {sum(cpu.values()):.2f}")
    ratios = {}
    if "direct session" in rows:
        direct = rows["direct session"]["mb_per_s"]
        ratios.update({f"direct_vs_{k.replace(' ', '_')}": round(direct / max(1e-9, rows[k]["mb_per_s"]), 3)
                       for k in ("relayed session", "plain UDP", "plain TCP")})
    tcp = rows["direct TCP"]["mb_per_s"]
    ratios.update({f"direct_tcp_vs_{k.replace(' ', '_')}": round(tcp / max(1e-9, rows[k]["mb_per_s"]), 3)
                   for k in ("relayed TCP", "plain TCP")})
    for name, ratio in ratios.items():
        verdict = f"  {'PASS' if ratio >= TARGET else 'MISS'} (>= {TARGET}x)" if name.endswith("plain_TCP") or \
            name.endswith("plain_UDP") else ""
        print(f"  {name}: {ratio:.2f}x{verdict}")
    if "relay" in rows:
        print(f"  the relay carried {rows['relay']['udpBytesRelayed']} UDP payload bytes (the relayed session's)")
    return {"seconds_each": seconds, "rows": rows, "ratios": ratios, "loadavg": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="chuantou: the direct path beside the relay, in NAT namespaces")
    parser.add_argument("--quick", action="store_true", help="1 s per load, 3 flows for the setup latency")
    parser.add_argument("--seconds", type=float, help="seconds per load (default 5)")
    parser.add_argument("--flows", type=int, help="new flows timed for the setup latency (default 10)")
    parser.add_argument("--tcp-only", action="store_true", help="only the TCP rows (direct, relayed, plain)")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    parser.add_argument("--role", choices=("plain", "udp", "setup", "tcp", "tcpsetup"), help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role:
        role_main(args)
        return 0
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    flows = args.flows or (3 if args.quick else 10)
    figures = report(run(seconds, flows, args.tcp_only), seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
