"""Where the time of "new connection to first echoed byte" goes, step by step.

    python bench/trace_connect.py [--connects N]

Builds the benchmark's tunnel with BENCH_TRACE_DIR set (roles.py then timestamps the steps of
each session set-up in the server, A and B, with one clock for all processes), makes N
sequential connections through the echo proxy exactly as bench_relay.py does, and prints for
each step the median and p90 time since the user's connect() began, in the order the steps
happen. Connections are sequential, so every step seen between a connect's start and its
first byte belongs to that connect.
"""

from __future__ import annotations

import argparse
import collections
import os
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_relay as br  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=300)
    parser.add_argument("--gap-ms", type=float, default=3.0,
                        help="pause after each connect (warm sessions refill in it; BENCH_WARM=N sets their number)")
    args = parser.parse_args(argv)

    tracedir = tempfile.mkdtemp(prefix="chuantou-trace-")
    os.environ["BENCH_TRACE_DIR"] = tracedir
    procs = br.Procs(tracedir)
    spans = []
    try:
        env = br.build(procs, want_socat=False)
        port = env["tunnel"]["echo"]
        br.connect_times(port, 20)  # warm-up
        time.sleep(0.2)
        clock = time.perf_counter_ns
        for _ in range(args.connects):
            t0 = clock()
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(br.IO_TIMEOUT)
            s.connect((br.HOST, port))
            t_conn = clock()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.send(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("no echo")
            t1 = clock()
            s.close()
            spans.append((t0, t_conn, t1))
            time.sleep(args.gap_ms / 1e3)  # let this session's teardown (and a warm refill) finish first
    finally:
        procs.stop_all()

    events = []
    for name in ("server", "clientA", "clientB"):
        path = os.path.join(tracedir, f"{name}.trace")
        if not os.path.exists(path):
            print(f"no trace from {name} (see {tracedir})")
            continue
        with open(path) as f:
            for line in f:
                ts, ev = line.split()
                events.append((int(ts), f"{name[-1] if name.startswith('client') else 'S'}:{ev}"))
    events.sort()

    steps: dict[str, list[float]] = collections.defaultdict(list)
    idx = 0
    for t0, t_conn, t1 in spans:
        while idx < len(events) and events[idx][0] < t0:
            idx += 1
        seen = set()
        j = idx
        while j < len(events) and events[j][0] <= t1:
            ts, ev = events[j]
            n = 1
            key = ev
            while key in seen:  # the second decode, the second data channel, ...
                n += 1
                key = f"{ev}#{n}"
            seen.add(key)
            steps[key].append((ts - t0) / 1e6)
            j += 1
        steps["user:connect() returned"].append((t_conn - t0) / 1e6)
        steps["user:first byte back"].append((t1 - t0) / 1e6)

    total = statistics.median(steps["user:first byte back"])
    print(f"{len(spans)} connects; median connect->first byte {total:.3f} ms\n")
    print(f"  {'step (S=server, A, B)':42s} {'seen':>5s} {'median ms':>10s} {'p90 ms':>8s}")
    order = sorted(steps, key=lambda k: statistics.median(steps[k]))
    prev = 0.0
    for key in order:
        vals = steps[key]
        if len(vals) < len(spans) * 0.5:
            continue
        med = statistics.median(vals)
        p90 = sorted(vals)[int(0.9 * (len(vals) - 1))]
        print(f"  {key:42s} {len(vals):5d} {med:10.3f} {p90:8.3f}   (+{med - prev:.3f})")
        prev = med
    print(f"\ntraces in {tracedir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
