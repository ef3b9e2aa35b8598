"""Compare two copies of the library in one run, on the same machine state.

    python bench/ab_compare.py BEFORE_DIR AFTER_DIR [--connects N] [--rtt N] [--size-mib N]

Each DIR is a tree with chuantou_server/, chuantou_client/ and common/ (for example
``git archive HEAD | tar -x -C DIR`` and then a patch applied in one of them); the roles.py
beside this script is copied into DIR/bench/ if DIR has none. Both tunnels are built side by
side and the measurements take turns in blocks, so a busy, shared machine hits both alike:
new connection to first byte (median, p99, relay CPU per connect), 1-byte round trip
(median) and one-stream upload/download (MB/s, relay CPU per GiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_relay as br  # noqa: E402


def roles_in(tree: str) -> str:
    path = os.path.join(tree, "bench", "roles.py")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copy(os.path.join(HERE, "roles.py"), path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--connects", type=int, default=600)
    parser.add_argument("--rtt", type=int, default=10000)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--connect-gap-ms", type=float, default=0.0,
                        help="pause between new connections (0: back to back; warm sessions refill in the pauses)")
    parser.add_argument("--only", default="connect,rtt,throughput", help="a subset of connect,rtt,throughput")
    args = parser.parse_args(argv)

    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    procs = br.Procs(br.tempfile.mkdtemp(prefix="chuantou-ab-"))
    try:
        envs = {label: br.build(procs, want_socat=False, roles=roles_in(tree), tag=f"-{label}")
                for label, tree in trees.items()}
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        pids = {label: list(env["pids"].values()) for label, env in envs.items()}

        only = set(args.only.split(","))
        gap = args.connect_gap_ms / 1e3
        if "connect" in only:  # connect -> first byte
            samples = {label: [] for label in envs}
            cpu = {label: 0.0 for label in envs}
            for env in envs.values():
                br.connect_times(env["tunnel"]["echo"], 20, gap)
            block = max(1, args.connects // args.rounds)
            for _ in range(args.rounds):
                for label, env in envs.items():
                    c0 = br.cpu_seconds(pids[label])
                    samples[label] += br.connect_times(env["tunnel"]["echo"], block, gap)
                    cpu[label] += br.cpu_seconds(pids[label]) - c0
            print(f"connect -> first byte, {block * args.rounds} each, in {args.rounds} alternating blocks"
                  f"{f', {args.connect_gap_ms:g} ms apart' if gap else ', back to back'}")
            for label in envs:
                s = samples[label]
                print(f"  {label:7s} median {statistics.median(s):6.3f} ms   p99 {br.pct(s, 99):7.3f} ms   "
                      f"relay CPU {1e3 * cpu[label] / len(s):.2f} ms per connect")

        if "rtt" in only:  # round trip
            ports = {label: env["tunnel"]["echo"] for label, env in envs.items()}
            rtt = br.round_trips(ports, args.rtt, 500, rounds=args.rounds)
            print(f"1-byte round trip, {args.rtt} each, alternating blocks")
            for label, s in rtt.items():
                print(f"  {label:7s} median {statistics.median(s):6.1f} µs   p99 {br.pct(s, 99):7.1f} µs")

        if "throughput" not in only:
            return 0
        size = args.size_mib * 1024 * 1024
        print(f"one-stream throughput, {args.size_mib} MiB, median of {args.repeat}, alternating")
        for direction, fn, key in (("upload", br.upload, "sink"), ("download", br.download, "source")):
            times = {label: [] for label in envs}
            cpu_by_role = {label: {role: 0.0 for role in env["pids"]} for label, env in envs.items()}
            for _ in range(args.repeat):
                for label, env in envs.items():
                    c0 = {role: br.cpu_seconds([pid]) for role, pid in env["pids"].items()}
                    times[label].append(fn(env["tunnel"][key], size))
                    for role, pid in env["pids"].items():
                        cpu_by_role[label][role] += br.cpu_seconds([pid]) - c0[role]
            gib = args.repeat * size / br.GIB
            for label in envs:
                mbps = size / statistics.median(times[label]) / br.MB
                per_role = {role: seconds / gib for role, seconds in cpu_by_role[label].items()}
                roles = "  ".join(f"{role} {value:.2f}" for role, value in per_role.items())
                print(f"  {direction:8s} {label:7s} {mbps:6.0f} MB/s   tunnel CPU {sum(per_role.values()):.2f} s/GiB"
                      f" ({roles})")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
