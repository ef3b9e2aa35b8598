"""A cross-node session beside a one-node session, in the same run: set-up latency ("new
connection to first echoed byte") and one-stream throughput.

    python bench/bench_cluster.py [--connects N] [--mib M]
    python bench/bench_cluster.py --hold N        sessions held by three nodes
    python bench/bench_cluster.py --store redis+cluster://HOST:PORT   against a running Redis (Cluster)


Starts a redis-server (no persistence, temporary directory), two relay nodes n1 and n2, an
echo service, client A on n1, B1 on n1 and B2 on n2, each in its own process (one GIL each, as
deployed); then measures A -> B1
(one node) and A -> B2 (data node n2, control through Redis) alternately, so both see the same
machine state. Needs redis-server and the redis package (pip install chuantou[cluster]).

With ``--hold N``: three nodes n1-n3, B1-B3 one on each, A on n1 with a proxy to each; N
sessions opened in batches spread evenly over the three (each pumped on its B's node), then
echoed again while all are open. Prints the sessions held per node, each node's RSS per session
it pumps, and what the descriptor limit allows one node and three.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_relay import _connect, _exchange_all, rss_kib, threads_of  # noqa: E402
from chuantou_client import Client  # noqa: E402
from chuantou_server import Server  # noqa: E402
from chuantou_server.caps import DEFAULT_DESCRIPTOR_RESERVE, DESCRIPTORS_PER_SESSION  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def echo_server(stop: threading.Event) -> int:
    listener = socket.create_server((HOST, 0), backlog=256)
    listener.settimeout(0.2)

    def serve(conn):
        with conn:
            try:
                while data := conn.recv(1 << 20):
                    conn.sendall(data)
            except OSError:  # reset by the tunnel at the end of a run
                pass

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=serve, args=(conn,), name="bench-echo", daemon=True).start()
        listener.close()

    threading.Thread(target=accept, name="bench-accept", daemon=True).start()
    return listener.getsockname()[1]


def setup_time(port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            raise RuntimeError("no echo")
        return time.perf_counter() - t0


def throughput(port: int, size: int) -> float:
    chunk = os.urandom(1 << 20)
    with socket.create_connection((HOST, port), timeout=30) as s:
        got = [0]

        def read():
            while got[0] < size:
                n = len(s.recv(1 << 20))
                if not n:
                    break
                got[0] += n
        reader = threading.Thread(target=read, name="bench-read", daemon=True)
        t0 = time.perf_counter()
        reader.start()
        for _ in range(size // len(chunk)):
            s.sendall(chunk)
        reader.join(60)
        return got[0] / (time.perf_counter() - t0) / (1 << 20)


def run_node(url: str, node_id: str, ports, stop) -> None:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as a deployed node would
    server = Server(host=HOST, port=0, cluster_url=url, node_id=node_id).start()
    ports.put((node_id, server.port))
    ports.put((f"{node_id}-pid", os.getpid()))
    stop.wait()
    server.stop()


def run_client(relay_port: int, client_id: str, proxies: list, ports, stop) -> None:
    client = Client(f"ws://{HOST}:{relay_port}", client_id).start()
    for name, target, target_port in proxies:
        ports.put((name, client.create_proxy(0, target, target_port, protocol="tcp").local_port))
    ports.put((client_id, 0))
    stop.wait()
    client.stop()


def run_echo(ports, stop) -> None:
    ports.put(("echo", echo_server(stop)))
    stop.wait()


def hold(count: int, proxies: dict[str, int], pids: dict[str, int], batch: int = 60) -> None:
    """Open ``count`` echoing sessions spread over ``proxies`` (node -> port), echo again on all."""
    import resource
    idle = {n: rss_kib(pid) for n, pid in pids.items()}
    socks: dict[int, socket.socket] = {}
    node_of = {}
    names = sorted(proxies)
    t0 = time.monotonic()
    try:
        for start in range(0, count, batch):
            new = {}
            for i in range(start, min(count, start + batch)):
                node_of[i] = names[i % len(names)]
                try:
                    new[i] = _connect(proxies[node_of[i]], timeout=20.0)
                    new[i].setblocking(False)
                except OSError:
                    pass
            _exchange_all(new, lambda i: b"hello %06d\n" % i, timeout=30.0)
            socks.update(new)
        opened = time.monotonic() - t0
        during = {n: (rss_kib(pid), threads_of(pid)) for n, pid in pids.items()}
        served = _exchange_all(socks, lambda i: b"again %06d\n" % i, timeout=60.0)
    finally:
        for sock in socks.values():
            sock.close()
    print(f"{len(served)} of {count} sessions held and answering with all open (opened in {opened:.1f} s)")
    for n in names:
        held = sum(1 for i in served if node_of[i] == n)
        kib = (during[n][0] - idle[n]) / max(1, held)
        print(f"  {n}: {held} held, RSS {during[n][0] / 1024:.1f} MiB ({kib:.1f} KiB per session), "
              f"{during[n][1]} threads")
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    one = (limit - DEFAULT_DESCRIPTOR_RESERVE) // DESCRIPTORS_PER_SESSION
    print(f"descriptor limit {limit} per node process: one node holds at most {one} TCP sessions "
          f"((limit - descriptorReserve {DEFAULT_DESCRIPTOR_RESERVE}) / {DESCRIPTORS_PER_SESSION}), "
          f"three nodes {3 * one}")


def main(argv=None) -> int:
    import multiprocessing
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--hold", type=int, metavar="N", help="hold N sessions over three nodes instead")
    parser.add_argument("--store", metavar="URL", help="a running Redis or Redis Cluster (redis+cluster://HOST:PORT) "
                        "instead of a redis-server started here")
    args = parser.parse_args(argv)
    redis_bin = shutil.which("redis-server")
    if not redis_bin and not args.store:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    tmp, rport = tempfile.mkdtemp(prefix="chuantou-bench-redis-"), free_port()
    redis_proc = None if args.store else subprocess.Popen(
        [str(redis_bin), "--port", str(rport), "--bind", HOST, "--dir", tmp, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL)
    mp = multiprocessing.get_context("fork")
    stop, ports, procs = mp.Event(), mp.Queue(), []

    def spawn(target, *targs, wait_for: tuple) -> dict:
        proc = mp.Process(target=target, args=(*targs, ports, stop), daemon=True)
        proc.start()
        procs.append(proc)
        got = {}
        while not set(wait_for) <= set(got):
            name, port = ports.get(timeout=30)
            got[name] = port
        return got

    try:
        time.sleep(0.3)  # redis-server's start (a benchmark, not a test)
        url = args.store or f"redis://{HOST}:{rport}/0"
        if args.hold:
            return run_hold(args.hold, url, spawn)
        n1 = spawn(run_node, url, "n1", wait_for=("n1",))["n1"]
        n2 = spawn(run_node, url, "n2", wait_for=("n2",))["n2"]
        echo = spawn(run_echo, wait_for=("echo",))["echo"]
        spawn(run_client, n1, "B1", [], wait_for=("B1",))
        spawn(run_client, n2, "B2", [], wait_for=("B2",))
        time.sleep(0.5)  # B2's registry key is written (a benchmark, not a test)
        proxies = spawn(run_client, n1, "A", [("one node", "B1", echo), ("cross-node", "B2", echo)],
                        wait_for=("one node", "cross-node", "A"))
        local, cross = proxies["one node"], proxies["cross-node"]
        print("each node, client and the echo service in its own process; redis-server on loopback")
        times = {"one node": [], "cross-node": []}
        for _ in range(20):  # warm-up
            setup_time(local), setup_time(cross)
        for _ in range(args.connects):
            times["one node"].append(setup_time(local))
            times["cross-node"].append(setup_time(cross))
            time.sleep(0.002)  # let teardown finish before the next set-up
        for name, port in (("one node", local), ("cross-node", cross)):
            ms = sorted(t * 1000 for t in times[name])
            print(f"{name:10s} set-up: median {statistics.median(ms):.3f} ms, p90 {ms[int(len(ms) * .9)]:.3f} ms; "
                  f"one stream {throughput(port, args.mib << 20):.0f} MiB/s")
        extra = statistics.median(times["cross-node"]) - statistics.median(times["one node"])
        print(f"the cluster adds {extra * 1000:.3f} ms to the median set-up")
    finally:
        stop.set()
        for proc in procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run_hold(count: int, url: str, spawn) -> int:
    nodes = {}
    for name in ("n1", "n2", "n3"):
        nodes.update(spawn(run_node, url, name, wait_for=(name, f"{name}-pid")))
    echo = spawn(run_echo, wait_for=("echo",))["echo"]
    for i, name in enumerate(("n1", "n2", "n3"), 1):
        spawn(run_client, nodes[name], f"B{i}", [], wait_for=(f"B{i}",))
    time.sleep(0.5)  # the B's registry keys are written (a benchmark, not a test)
    proxies = spawn(run_client, nodes["n1"], "A", [(f"n{i}", f"B{i}", echo) for i in (1, 2, 3)],
                    wait_for=("n1", "n2", "n3", "A"))
    print("three nodes, each node, client and the echo service in its own process; redis-server on loopback")
    hold(count, {n: proxies[n] for n in ("n1", "n2", "n3")}, {n: nodes[f"{n}-pid"] for n in ("n1", "n2", "n3")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
