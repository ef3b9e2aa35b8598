"""The relay's hop alone: one TCP stream through common.pipe.Pipe and through SplicePipe, side by side.

    python bench/bench_pump.py [--size-mib N] [--rounds N] [--lib DIR]

A source and a sink (in this process, plain recv/sendall of 1 MiB, no Python per byte) are
joined by a pump running in a child process, as the relay joins A's and B's data channels. The
two pumps take turns, ``--rounds`` times each; it prints MB/s (median) and the pump process's
CPU seconds per GiB. ``--lib`` runs another copy of the library. No sealing, no WebSocket: what
the relay itself costs.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1024 ** 3
CHUNK = 1024 * 1024

PUMP = r"""
import os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from common.pipe import Pipe
from common.splicepipe import SplicePipe
from common.threads import ThreadGroup
kind, port_in, port_out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
listener = socket.create_server(("127.0.0.1", port_in))
print("ready", flush=True)
while True:
    a, _ = listener.accept()
    b = socket.create_connection(("127.0.0.1", port_out))
    b.settimeout(None)
    group = ThreadGroup("bench-pump")
    pipe = (SplicePipe if kind == "splice" else Pipe)(a, b)
    pipe.run(group, "pump")
"""


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_transfer(pump_port: int, sink: socket.socket, size: int) -> float:
    """Send ``size`` bytes into the pump; return the seconds until the sink has them all."""
    got = []

    def drain():
        conn, _ = sink.accept()
        buf = bytearray(CHUNK)
        total = 0
        while True:
            n = conn.recv_into(buf)
            if not n:
                break
            total += n
        got.append(total)
        conn.close()

    reader = threading.Thread(target=drain, name="bench-sink")
    reader.start()
    block = os.urandom(CHUNK)
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", pump_port)) as user:
        for _ in range(size // CHUNK):
            user.sendall(block)
        user.shutdown(socket.SHUT_WR)
        reader.join(120)
        user.recv(1)
    elapsed = time.perf_counter() - started
    assert got == [size], got
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lib", default=os.path.dirname(HERE))
    args = parser.parse_args(argv)
    size = args.size_mib * CHUNK
    pumps = {}
    try:
        for kind in ("plain", "splice"):
            sink = socket.create_server(("127.0.0.1", 0))
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-c", PUMP, args.lib, kind, str(port),
                                     str(sink.getsockname()[1])], stdout=subprocess.PIPE, text=True)
            assert proc.stdout.readline().strip() == "ready"
            pumps[kind] = (proc, port, sink)
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        times = {kind: [] for kind in pumps}
        cpu = {kind: 0.0 for kind in pumps}
        for _ in range(args.rounds):
            for kind, (proc, port, sink) in pumps.items():
                c0 = cpu_of(proc.pid)
                times[kind].append(one_transfer(port, sink, size))
                cpu[kind] += cpu_of(proc.pid) - c0
        for kind in pumps:
            mbps = size / statistics.median(times[kind]) / 1e6
            print(f"  {kind:6s} {mbps:7.0f} MB/s   pump CPU {cpu[kind] / (args.rounds * size / GIB):.2f} s/GiB")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for proc, _, sink in pumps.values():
            proc.kill()
            proc.wait(10)
            sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
