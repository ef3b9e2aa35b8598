"""Benchmark of the chuantou relay on loopback, every figure beside the same measurement direct.

    python bench/bench_relay.py [--quick] [--json FILE] [--size-mib N] [--rtt N] [--connects N]
                                [--sessions N] [--udp-rate N] [--udp-seconds S]

Starts, as separate processes: the service (TCP echo / source / sink and UDP echo), the relay
server, client B (the target) and client A (with proxies to B's echo, source and sink ports),
and, when socat is installed, three chained ``socat`` hops in front of the echo service.
Then measures, in this one run:

1. one-stream throughput, MB/s, both directions, and CPU seconds per GiB relayed (server+A+B);
2. 1-byte round trip over an open connection, µs (median, p99), also through the socat hops;
3. new connection to first echoed byte, ms (median, p99);
4. N simultaneous connections through one proxy, all served, and RSS per open session;
5. UDP: 64-byte datagrams at a fixed rate with a bounded window, loss %.

Everything stays on 127.0.0.1; every loop is bounded in count and time; every child process is
ended when the run ends, whatever happens.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import multistream

HERE = os.path.dirname(os.path.abspath(__file__))
ROLES = os.path.join(HERE, "roles.py")
HOST = "127.0.0.1"
BUF = 1024 * 1024
MB = 1e6
GIB = 1024 ** 3
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
IO_TIMEOUT = 20.0

PHASES = ("throughput", "streams", "rtt", "connect", "sessions", "udp")

TARGETS = {  # issue 13's
    "throughput_ratio": 0.5,
    "streams_ratio": 0.5,
    "tunnel_cpu_s_per_gib": 0.9,
    "rtt_vs_socat": 0.8,
    "connect_median_ms": 1.0,
    "connect_p99_ms": 5.0,
    "rss_per_session_kib": 96.0,
    "udp_loss_pct": 1.0,
}
STREAMS = 8


# --- processes ------------------------------------------------------------------------------

class Procs:
    """Every child process of the run; ``stop_all`` ends them (process group, TERM then KILL)."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], expect_ready: bool = True, timeout: float = 20.0) -> tuple[subprocess.Popen, list[str]]:
        log = open(os.path.join(self.logdir, f"{name}.log"), "wb")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE if expect_ready else subprocess.DEVNULL,
                                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        lines: list[str] = []
        if not expect_ready:
            return proc, lines
        deadline = time.monotonic() + timeout
        buf = b""
        fd = proc.stdout.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{name} not ready within {timeout:g} s; see {self.logdir}/{name}.log")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"{name} exited before ready (rc={proc.poll()}): "
                                   f"{self.tail(name)}")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode().strip()
                if text == "READY":
                    return proc, lines
                lines.append(text)

    def tail(self, name: str) -> str:
        try:
            with open(os.path.join(self.logdir, f"{name}.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10.0
        for name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the group too: socat's forked children, anything left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.kill()
        for name, proc in reversed(self.procs):  # a process of 18,000 threads takes a while to die
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                print(f"warning: {name} (pid {proc.pid}) still alive after SIGKILL", file=sys.stderr)
            if proc.stdout:
                proc.stdout.close()


def free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cpu_seconds(pids: list[int], reaped_children: bool = False) -> float:
    """User+system CPU of the processes (all their threads), from /proc/PID/stat; with
    ``reaped_children`` also that of their children that have ended and been waited for."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        if reaped_children:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    return total / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


# --- measurements ---------------------------------------------------------------------------

def _connect(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((HOST, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return data


_PAYLOAD = memoryview(os.urandom(BUF))


def upload(sink_port: int, nbytes: int) -> float:
    """Send nbytes to the sink, wait for its count; return seconds."""
    s = _connect(sink_port)
    try:
        t0 = time.perf_counter()
        left = nbytes
        while left:
            n = min(left, BUF)
            s.sendall(_PAYLOAD[:n])
            left -= n
        s.shutdown(socket.SHUT_WR)
        (got,) = struct.unpack("!Q", _recv_exact(s, 8))
        t1 = time.perf_counter()
    finally:
        s.close()
    if got != nbytes:
        raise RuntimeError(f"sink received {got} of {nbytes} bytes")
    return t1 - t0


def download(source_port: int, nbytes: int) -> float:
    """Ask the source for nbytes and read them all; return seconds."""
    s = _connect(source_port)
    buf = bytearray(BUF)
    try:
        t0 = time.perf_counter()
        s.sendall(struct.pack("!Q", nbytes))
        got = 0
        recv_into = s.recv_into
        while got < nbytes:
            n = recv_into(buf)
            if not n:
                break
            got += n
        t1 = time.perf_counter()
    finally:
        s.close()
    if got != nbytes:
        raise RuntimeError(f"source delivered {got} of {nbytes} bytes")
    return t1 - t0


def round_trips(ports: dict[str, int], count: int, warmup: int, rounds: int = 10) -> dict[str, list[float]]:
    """1-byte ping-pong over one open connection per path; samples in µs.

    The paths take turns in ``rounds`` blocks so that each sees the same machine state (CPU
    frequency and idle states swing loopback round trips by several times within a minute).
    """
    socks = {label: _connect(port) for label, port in ports.items()}
    samples: dict[str, list[float]] = {label: [] for label in ports}
    clock = time.perf_counter_ns
    deadline = time.monotonic() + 90.0
    try:
        for s in socks.values():
            for _ in range(warmup):
                s.send(b"x")
                if s.recv(1) != b"x":
                    raise RuntimeError("echo returned the wrong byte")
        per_round = max(1, count // rounds)
        for _ in range(rounds):
            for label, s in socks.items():
                send, recv, out = s.send, s.recv, samples[label]
                for _ in range(per_round):
                    t0 = clock()
                    send(b"x")
                    if not recv(1):
                        raise ConnectionError("echo closed")
                    out.append((clock() - t0) / 1000.0)
            if time.monotonic() > deadline:
                break
    finally:
        for s in socks.values():
            s.close()
    return samples


def connect_times(echo_port: int, count: int, gap: float = 0.0) -> list[float]:
    """New connection, one byte out, first byte back, close; samples in ms. ``gap``: seconds
    between connections (0: back to back, a burst; warm sessions refill in the gaps)."""
    samples = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + 60.0
    for _ in range(count):
        t0 = clock()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(IO_TIMEOUT)
            s.connect((HOST, echo_port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.send(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("no echo on a new connection")
            samples.append((clock() - t0) / 1e6)
        finally:
            s.close()
        if time.monotonic() > deadline:
            break
        if gap:
            time.sleep(gap)
    return samples


def _exchange_all(socks: dict[int, socket.socket], payload_of, timeout: float) -> set[int]:
    """Send each socket its payload, then collect the echoes; return the indexes fully answered."""
    want: dict[int, bytes] = {}
    got: dict[int, bytes] = {}
    for i, s in socks.items():
        data = payload_of(i)
        try:
            s.sendall(data)
            want[i] = data
            got[i] = b""
        except OSError:
            pass
    sel_socks = {s.fileno(): i for i, s in socks.items() if i in want}
    pending = set(sel_socks)
    deadline = time.monotonic() + timeout
    done = set()
    poller = select.poll()
    for fd in pending:
        poller.register(fd, select.POLLIN)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for fd, _ in poller.poll(min(remaining, 1.0) * 1000):
            i = sel_socks[fd]
            try:
                chunk = socks[i].recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if not chunk:
                pending.discard(fd)
                poller.unregister(fd)
                continue
            got[i] += chunk
            if len(got[i]) >= len(want[i]):
                pending.discard(fd)
                poller.unregister(fd)
                if got[i] == want[i]:
                    done.add(i)
    return done


def many_sessions(echo_port: int, count: int, role_pids: list[int], batch: int = 100) -> dict:
    """Open ``count`` connections (in batches, each one echoing), then with all open measure RSS and
    echo again on every one of them."""
    rss_before = {pid: rss_kib(pid) for pid in role_pids}
    threads_before = {pid: threads_of(pid) for pid in role_pids}
    socks: dict[int, socket.socket] = {}
    failed_open = 0
    served_first: set[int] = set()
    t0 = time.monotonic()
    try:
        for start in range(0, count, batch):
            new = {}
            for i in range(start, min(count, start + batch)):
                try:
                    new[i] = _connect(echo_port, timeout=IO_TIMEOUT)
                    new[i].setblocking(False)
                except OSError:
                    failed_open += 1
            served_first |= _exchange_all(new, lambda i: b"hello %06d\n" % i, timeout=30.0)
            socks.update(new)
            if time.monotonic() - t0 > 120:
                break
        open_time = time.monotonic() - t0
        time.sleep(0.5)  # let the last sessions settle before reading memory
        rss_during = {pid: rss_kib(pid) for pid in role_pids}
        threads_during = {pid: threads_of(pid) for pid in role_pids}
        served_second = _exchange_all(socks, lambda i: b"again %06d\n" % i, timeout=30.0)
    finally:
        for s in socks.values():
            s.close()
    served = served_first & served_second
    delta = sum(rss_during.values()) - sum(rss_before.values())
    return {
        "requested": count,
        "opened": len(socks),
        "served_all_open": len(served),
        "dropped": count - len(served),
        "open_seconds": round(open_time, 2),
        "rss_before_kib": rss_before,
        "rss_during_kib": rss_during,
        "threads_before": threads_before,
        "threads_during": threads_during,
        "rss_delta_kib": delta,
        "rss_per_session_kib": delta / max(1, count),
    }


def udp_run(port: int, rate: int, seconds: float, window: int, size: int = 64) -> dict:
    """Send ``rate`` datagrams/s of ``size`` bytes for ``seconds`` with at most ``window`` unanswered
    (an unanswered datagram stops counting against the window after 0.5 s); count the echoes."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    s.connect((HOST, port))
    pad = b"\0" * (size - 8)
    # Warm-up: the first datagram opens the UDP session on A; wait until echoes come back.
    s.settimeout(0.2)
    deadline = time.monotonic() + 10.0
    while True:
        if time.monotonic() > deadline:
            s.close()
            raise RuntimeError("UDP warm-up got no echo within 10 s")
        s.send(struct.pack("!q", -1) + pad)
        try:
            if s.recv(65536)[:8] == struct.pack("!q", -1):
                break
        except (socket.timeout, ConnectionRefusedError):
            continue
    # Drain stray warm-up echoes.
    s.setblocking(False)
    time.sleep(0.1)
    while True:
        try:
            s.recv(65536)
        except (BlockingIOError, ConnectionRefusedError):
            break
    received: set[int] = set()
    outstanding: dict[int, float] = {}
    order: collections.deque = collections.deque()
    expired = 0
    window_waits = 0
    sent = 0
    send, recv = s.send, s.recv
    pack, unpack = struct.Struct("!q").pack, struct.Struct("!q").unpack_from
    clock = time.perf_counter
    start = clock()
    end = start + seconds
    while True:
        now = clock()
        if now >= end:
            break
        while True:  # take in every echo waiting
            try:
                data = recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            seq = unpack(data)[0]
            if seq >= 0:
                received.add(seq)
                outstanding.pop(seq, None)
        old = now - 0.5
        while order and order[0][1] < old:
            seq, _ = order.popleft()
            if outstanding.pop(seq, None) is not None:
                expired += 1
        due = int((now - start) * rate)
        while sent < due and len(outstanding) < window:
            try:
                send(pack(sent) + pad)
            except (BlockingIOError, ConnectionRefusedError):
                break
            outstanding[sent] = now
            order.append((sent, now))
            sent += 1
        if sent < due:
            window_waits += 1
        select.select([s], [], [], 0.0005)
    send_seconds = clock() - start
    drain_end = clock() + 1.0
    while outstanding and clock() < drain_end:
        select.select([s], [], [], 0.05)
        while True:
            try:
                data = recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                continue
            seq = unpack(data)[0]
            if seq >= 0:
                received.add(seq)
                outstanding.pop(seq, None)
    s.close()
    lost = sent - len(received)
    return {
        "sent": sent,
        "received": len(received),
        "lost": lost,
        "loss_pct": 100.0 * lost / max(1, sent),
        "rate_achieved": sent / send_seconds,
        "window_waits": window_waits,
    }


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))]


# --- the run --------------------------------------------------------------------------------

def build(procs: Procs, want_socat: bool, roles: str = ROLES, tag: str = "", server_args: tuple = ()) -> dict:
    """Start service, server, B and A (with proxies to the service) and, if asked, the socat
    hops. ``roles`` may be the roles.py of another copy of the library (it runs the library it
    sits beside); ``tag`` tells apart the logs of two tunnels built side by side."""
    py = sys.executable
    _, lines = procs.start(f"service{tag}", [py, roles, "service"])
    echo, source, sink = (int(x) for x in lines[-1].split()[1:4])
    server_proc, lines = procs.start(f"server{tag}", [py, roles, "server", *server_args])
    relay_port = int(lines[-1].split()[1])
    url = f"ws://{HOST}:{relay_port}"
    b_proc, _ = procs.start(f"clientB{tag}", [py, roles, "client", "--server", url, "--id", "B"])
    a_proc, lines = procs.start(f"clientA{tag}", [
        py, roles, "client", "--server", url, "--id", "A",
        "--proxy", f"echo:B:{echo}:both", "--proxy", f"source:B:{source}:tcp", "--proxy", f"sink:B:{sink}:tcp",
    ])
    proxies = {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("PROXY ")}
    env = {
        "direct": {"echo": echo, "source": source, "sink": sink},
        "tunnel": proxies,
        "pids": {"server": server_proc.pid, "A": a_proc.pid, "B": b_proc.pid},
        "socat": None,
    }
    socat = shutil.which("socat")
    if want_socat and socat:
        ports = [free_port() for _ in range(3)]
        chain = ports + [echo]
        for i in range(3):
            procs.start(f"socat{i + 1}", [socat, f"TCP-LISTEN:{chain[i]},bind={HOST},reuseaddr,fork",
                                          f"TCP:{HOST}:{chain[i + 1]}"], expect_ready=False)
        deadline = time.monotonic() + 10.0
        for port in ports:  # wait until each hop listens
            while True:
                try:
                    socket.create_connection((HOST, port), timeout=1.0).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"socat did not listen on {port}")
                    time.sleep(0.05)
        env["socat"] = {"echo": ports[0], "source": None, "sink": None}
        env["socat_echo_pids"] = [proc.pid for name, proc in procs.procs if name.startswith("socat")]
        # socat throughput, for scale: chain in front of source and sink too
        for kind, target in (("source", source), ("sink", sink)):
            ps = [free_port() for _ in range(3)]
            ch = ps + [target]
            for i in range(3):
                procs.start(f"socat-{kind}{i + 1}", [socat, f"TCP-LISTEN:{ch[i]},bind={HOST},reuseaddr,fork",
                                                     f"TCP:{HOST}:{ch[i + 1]}"], expect_ready=False)
            for port in ps:
                while True:
                    try:
                        socket.create_connection((HOST, port), timeout=1.0).close()
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"socat did not listen on {port}")
                        time.sleep(0.05)
            env["socat"][kind] = ps[0]
    return env


def run(args) -> dict:
    quick = args.quick
    size = (args.size_mib or (32 if quick else 256)) * 1024 * 1024
    n_rtt = args.rtt or (2000 if quick else 20000)
    n_conn = args.connects or (100 if quick else 500)
    n_sessions = args.sessions or (200 if quick else 1000)
    udp_seconds = args.udp_seconds or (1.0 if quick else 3.0)
    repeats = args.repeat or (1 if quick else 3)
    phases = set(args.only.split(",")) if args.only else set(PHASES)
    unknown = phases - set(PHASES)
    if unknown:
        raise SystemExit(f"--only: unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    results: dict = {"config": {
        "quick": quick, "bytes": size, "repeats": repeats, "round_trips": n_rtt, "connects": n_conn, "sessions": n_sessions,
        "udp_rate": args.udp_rate, "udp_seconds": udp_seconds, "udp_window": args.udp_window,
        "cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
    }}
    logdir = tempfile.mkdtemp(prefix="chuantou-bench-")
    procs = Procs(logdir)
    t_start = time.monotonic()
    try:
        env = build(procs, not args.no_socat)
        pids = list(env["pids"].values())
        d, t, sc = env["direct"], env["tunnel"], env["socat"]
        print(f"chuantou relay benchmark: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"logs in {logdir}")
        results["loadavg_start"] = os.getloadavg()
        print("load average at start: %.2f %.2f %.2f (the machine may be shared; wake-up-bound figures "
              "follow the load)" % results["loadavg_start"])
        print(f"processes: server={env['pids']['server']} A={env['pids']['A']} B={env['pids']['B']}; "
              f"socat {'3 hops' if sc else 'not used'}")
        print()

        # 1. throughput
        if "throughput" in phases:
            print(f"[1] one-stream throughput, {size // (1024 * 1024)} MiB each way, median of {repeats} "
                  f"(direct, tunnel and socat taking turns)")
            upload(d["sink"], 8 * BUF), upload(t["sink"], 8 * BUF)  # warm-up: sessions, page cache, buffers
            download(d["source"], 8 * BUF), download(t["source"], 8 * BUF)
            tp = {}
            for label, fn, key in (("upload", upload, "sink"), ("download", download, "source")):
                times: dict[str, list[float]] = {"direct": [], "tunnel": [], "socat": []}
                cpu = 0.0
                for _ in range(repeats):  # the paths take turns; the median of each is reported
                    times["direct"].append(fn(d[key], size))
                    cpu0 = cpu_seconds(pids)
                    times["tunnel"].append(fn(t[key], size))
                    cpu += cpu_seconds(pids) - cpu0
                    if sc and sc.get(key):
                        times["socat"].append(fn(sc[key], size))
                direct_s = statistics.median(times["direct"])
                tunnel_s = statistics.median(times["tunnel"])
                socat_s = statistics.median(times["socat"]) if times["socat"] else None
                row = {
                    "direct_MBps": size / direct_s / MB,
                    "tunnel_MBps": size / tunnel_s / MB,
                    "ratio": direct_s / tunnel_s,
                    "tunnel_MBps_each": [size / x / MB for x in times["tunnel"]],
                    "direct_MBps_each": [size / x / MB for x in times["direct"]],
                    "cpu_s": cpu,
                    "cpu_s_per_GiB": cpu / (repeats * size / GIB),
                    "socat_MBps": size / socat_s / MB if socat_s else None,
                    "socat_ratio": direct_s / socat_s if socat_s else None,
                }
                tp[label] = row
                extra = (f"   (socat 3 hops {row['socat_MBps']:6.0f} MB/s = {row['socat_ratio']:.2f}x)"
                         if socat_s else "")
                print(f"    {label:8s}  direct {row['direct_MBps']:6.0f} MB/s   tunnel {row['tunnel_MBps']:6.0f} MB/s"
                      f"   ratio {row['ratio']:.2f}x   CPU {row['cpu_s_per_GiB']:.2f} s/GiB (server+A+B){extra}")
            results["throughput"] = tp

        # 1b. several streams at once
        if "streams" in phases:
            results["streams"] = streams_phase(d, t, sc, size, repeats, pids)

        # 2. round trip
        if "rtt" in phases:
            print(f"[2] 1-byte round trip over an open connection, {n_rtt} round trips per path, "
                  f"paths taking turns in 10 blocks")
            warm = max(200, n_rtt // 20)
            rtt = {}
            ports = {"direct": d["echo"], "tunnel": t["echo"]}
            if sc:
                ports["socat"] = sc["echo"]
            socat_pids = env.get("socat_echo_pids") or []
            cpu0 = cpu_seconds(pids)
            socat_cpu0 = cpu_seconds(socat_pids, reaped_children=True)
            all_samples = round_trips(ports, n_rtt, warm)
            relay_cpu = cpu_seconds(pids) - cpu0
            time.sleep(0.2)  # socat's per-connection children end and are reaped
            socat_cpu = cpu_seconds(socat_pids, reaped_children=True) - socat_cpu0
            for label, samples in all_samples.items():
                rtt[label] = {"median_us": statistics.median(samples), "p99_us": pct(samples, 99),
                              "mean_us": statistics.fmean(samples), "count": len(samples)}
            for label, row in rtt.items():
                ratio = row["median_us"] / rtt["direct"]["median_us"]
                print(f"    {label:8s}  median {row['median_us']:8.1f} µs   p99 {row['p99_us']:8.1f} µs"
                      f"   median/direct {ratio:.2f}x")
            if "socat" in rtt:
                rtt["tunnel_vs_socat"] = rtt["tunnel"]["median_us"] / rtt["socat"]["median_us"]
                print(f"    tunnel median / socat median = {rtt['tunnel_vs_socat']:.2f}x")
            rtt["relay_cpu_us_per_round_trip"] = 1e6 * relay_cpu / max(1, len(all_samples["tunnel"]) + warm)
            line = f"    CPU per round trip: server+A+B {rtt['relay_cpu_us_per_round_trip']:.1f} µs"
            if socat_pids:
                rtt["socat_cpu_us_per_round_trip"] = 1e6 * socat_cpu / max(1, len(all_samples["socat"]) + warm)
                line += f", the three socat hops {rtt['socat_cpu_us_per_round_trip']:.1f} µs"
            print(line)
            results["rtt"] = rtt

        # 3. connect to first byte
        if "connect" in phases:
            print(f"[3] new connection to first echoed byte, {n_conn} sequential connects")
            ct = {}
            conn_ports = {"direct": d["echo"], "tunnel": t["echo"]}
            conn_samples: dict[str, list[float]] = {label: [] for label in conn_ports}
            for port in conn_ports.values():
                connect_times(port, min(20, n_conn))  # warm-up
            cpu = 0.0
            block = max(1, n_conn // 10)
            for _ in range(10):  # the two paths take turns
                conn_samples["direct"] += connect_times(d["echo"], block)
                cpu0 = cpu_seconds(pids)
                conn_samples["tunnel"] += connect_times(t["echo"], block)
                cpu += cpu_seconds(pids) - cpu0
            for label, samples in conn_samples.items():
                ct[label] = {"median_ms": statistics.median(samples), "p99_ms": pct(samples, 99),
                             "max_ms": max(samples), "count": len(samples)}
            ct["relay_cpu_ms_per_connect"] = 1e3 * cpu / max(1, len(conn_samples["tunnel"]))
            for label in conn_ports:
                row = ct[label]
                print(f"    {label:8s}  median {row['median_ms']:7.3f} ms   p99 {row['p99_ms']:7.3f} ms"
                      f"   max {row['max_ms']:7.3f} ms   median/direct {row['median_ms'] / ct['direct']['median_ms']:.1f}x")
            print(f"    CPU of server+A+B per tunnel connect: {ct['relay_cpu_ms_per_connect']:.2f} ms")
            results["connect"] = ct

        # 4. simultaneous sessions
        if "sessions" in phases:
            print(f"[4] {n_sessions} simultaneous connections through one proxy")
            time.sleep(1.0)  # let the sessions of [3] end
            ms = many_sessions(t["echo"], n_sessions, pids)
            names = {v: k for k, v in env["pids"].items()}
            before = " ".join(f"{names[p]}={v / 1024:.1f}" for p, v in ms["rss_before_kib"].items())
            during = " ".join(f"{names[p]}={v / 1024:.1f}" for p, v in ms["rss_during_kib"].items())
            thr = " ".join(f"{names[p]}={v}" for p, v in ms["threads_during"].items())
            print(f"    served while all open: {ms['served_all_open']}/{n_sessions}, dropped {ms['dropped']}"
                  f" (opened in {ms['open_seconds']:.1f} s)")
            print(f"    RSS MiB before: {before}   during: {during}   threads during: {thr}")
            print(f"    RSS per open session (server+A+B): {ms['rss_per_session_kib']:.1f} KiB")
            results["sessions"] = ms

        # 5. UDP
        if "udp" in phases:
            print(f"[5] UDP: {args.udp_rate} datagrams/s of 64 bytes for {udp_seconds:g} s, window {args.udp_window}")
            udp = {}
            for label, port in (("direct", d["echo"]), ("tunnel", t["echo"])):
                udp[label] = udp_run(port, args.udp_rate, udp_seconds, args.udp_window)
                u = udp[label]
                print(f"    {label:8s}  sent {u['sent']}  echoed {u['received']}  loss {u['loss_pct']:.2f} %"
                      f"   rate {u['rate_achieved']:.0f}/s")
            results["udp"] = udp
        results["seconds"] = time.monotonic() - t_start
        results["loadavg_end"] = os.getloadavg()
    finally:
        procs.stop_all()
    return results


def streams_phase(d: dict, t: dict, sc: dict | None, size: int, repeats: int, pids: list[int]) -> dict:
    per_stream = max(BUF, size // STREAMS)
    print(f"[1b] {STREAMS} streams at once, {per_stream // (1024 * 1024)} MiB each way per stream, median of {repeats}")
    paths = {"direct": d, "tunnel": t}
    if sc and sc.get("sink"):
        paths["socat"] = sc
    out: dict = {"streams": STREAMS, "bytes_per_stream": per_stream}
    for label, fn, key in (("upload", upload, "sink"), ("download", download, "source")):
        cpu0 = cpu_seconds(pids)
        mbps = multistream.aggregate(paths, key, fn, per_stream, STREAMS, repeats)
        cpu = cpu_seconds(pids) - cpu0  # all paths ran; only the tunnel's processes are counted
        row = {"direct_MBps": mbps["direct"], "tunnel_MBps": mbps["tunnel"],
               "ratio": mbps["tunnel"] / mbps["direct"], "socat_MBps": mbps.get("socat"),
               "cpu_s_per_GiB": cpu / (repeats * per_stream * STREAMS / GIB)}
        out[label] = row
        extra = f"   (socat {row['socat_MBps']:6.0f} MB/s)" if row["socat_MBps"] else ""
        print(f"    {label:8s}  direct {row['direct_MBps']:6.0f} MB/s   tunnel {row['tunnel_MBps']:6.0f} MB/s"
              f"   ratio {row['ratio']:.2f}x   CPU {row['cpu_s_per_GiB']:.2f} s/GiB (server+A+B){extra}")
    return out


def summary(results: dict, args) -> list[tuple]:
    rows = []

    def add(name, value, target, ok):
        rows.append((name, value, target, "PASS" if ok else "MISS"))

    T = TARGETS
    if "throughput" in results:
        for label in ("upload", "download"):
            r = results["throughput"][label]["ratio"]
            add(f"throughput {label} / direct", f"{r:.2f}x", f">= {T['throughput_ratio']}x",
                r >= T["throughput_ratio"])
            c = results["throughput"][label]["cpu_s_per_GiB"]
            add(f"tunnel CPU {label}", f"{c:.2f} s/GiB", f"<= {T['tunnel_cpu_s_per_gib']} s/GiB",
                c <= T["tunnel_cpu_s_per_gib"])
    if "streams" in results:
        for label in ("upload", "download"):
            r = results["streams"][label]["ratio"]
            add(f"{STREAMS} streams {label} / direct", f"{r:.2f}x", f">= {T['streams_ratio']}x",
                r >= T["streams_ratio"])
    if "rtt" in results:
        rtt = results["rtt"]
        if "tunnel_vs_socat" in rtt:
            r = rtt["tunnel_vs_socat"]
            add("RTT median / socat 3 hops", f"{r:.2f}x", f"<= {T['rtt_vs_socat']}x", r <= T["rtt_vs_socat"])
        else:
            rows.append(("RTT median / socat 3 hops", "n/a", f"<= {T['rtt_vs_socat']}x", "SKIP (no socat)"))
    if "connect" in results:
        c = results["connect"]["tunnel"]
        add("connect->first byte median", f"{c['median_ms']:.2f} ms", f"<= {T['connect_median_ms']} ms",
            c["median_ms"] <= T["connect_median_ms"])
        add("connect->first byte p99", f"{c['p99_ms']:.2f} ms", f"<= {T['connect_p99_ms']} ms",
            c["p99_ms"] <= T["connect_p99_ms"])
    if "sessions" in results:
        s = results["sessions"]
        add(f"{s['requested']} simultaneous, dropped", f"{s['dropped']}", "0", s["dropped"] == 0)
        add("RSS per open session", f"{s['rss_per_session_kib']:.1f} KiB", f"< {T['rss_per_session_kib']:.0f} KiB",
            s["rss_per_session_kib"] < T["rss_per_session_kib"])
    if "udp" in results:
        u = results["udp"]["tunnel"]
        add("UDP loss", f"{u['loss_pct']:.2f} %", f"< {T['udp_loss_pct']} %", u["loss_pct"] < T["udp_loss_pct"])
        add("UDP rate achieved", f"{u['rate_achieved']:.0f}/s", f">= {0.95 * args.udp_rate:.0f}/s",
            u["rate_achieved"] >= 0.95 * args.udp_rate)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="chuantou relay benchmark (loopback only)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    parser.add_argument("--size-mib", type=int, help="bytes per throughput run (default 256, quick 32)")
    parser.add_argument("--repeat", type=int, help="throughput runs per path and direction (default 3, quick 1)")
    parser.add_argument("--rtt", type=int, help="round trips (default 20000, quick 2000)")
    parser.add_argument("--connects", type=int, help="sequential connects (default 500, quick 100)")
    parser.add_argument("--sessions", type=int, help="simultaneous connections (default 1000, quick 200)")
    parser.add_argument("--udp-rate", type=int, default=20000, help="datagrams per second (default 20000)")
    parser.add_argument("--udp-seconds", type=float, help="UDP duration (default 3, quick 1)")
    parser.add_argument("--udp-window", type=int, default=256, help="max unanswered datagrams (default 256)")
    parser.add_argument("--only", metavar="PHASES",
                        help="comma-separated subset of: " + ",".join(PHASES))
    parser.add_argument("--no-socat", action="store_true", help="do not start the socat comparison")
    args = parser.parse_args(argv)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = run(args)
    rows = summary(results, args)
    results["summary"] = [dict(zip(("figure", "value", "target", "result"), row)) for row in rows]
    print_summary(rows, results)
    write_json(args.json, results)
    return 0


def print_summary(rows, results: dict) -> None:
    """The PASS/MISS table of (figure, value, target, result) rows, after the run's time and load."""
    print(f"\nsummary ({results['seconds']:.0f} s, load average at end "
          f"{' '.join(f'{x:.2f}' for x in results['loadavg_end'])})")
    w = max((len(r[0]) for r in rows), default=10)
    print(f"  {'figure':{w}s}  {'value':>12s}  {'target':>12s}  result")
    for name, value, target, verdict in rows:
        print(f"  {name:{w}s}  {value:>12s}  {target:>12s}  {verdict}")


def write_json(path: str | None, results: dict) -> None:
    """--json FILE: the figures, for comparing runs."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"figures written to {path}")


if __name__ == "__main__":
    sys.exit(main())
