"""Profile one benchmark phase: build the same tunnel as bench_relay.py, run the phase in a
loop, and sample the relay server, client A and client B with py-spy while it runs.

    python bench/profile_relay.py connect|rtt|upload|download [--seconds S] [--out DIR] [--native]

Prints the work done, the CPU each role process used per operation, and per process the
functions with the most samples (own time and inclusive), sampling only the thread that holds
the GIL (``py-spy --gil``), i.e. where the Python CPU time goes. py-spy must be installed
(``pip install py-spy``); without it only the CPU figures are printed. The raw collapsed
stacks stay in DIR for flame graphs.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_relay as br  # noqa: E402


def user_sys(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / br.CLK_TCK, int(fields[12]) / br.CLK_TCK


def one_op(phase: str, env: dict, size: int):
    t = env["tunnel"]
    if phase == "connect":
        br.connect_times(t["echo"], 1)
    elif phase == "upload":
        br.upload(t["sink"], size)
    elif phase == "download":
        br.download(t["source"], size)
    else:
        raise ValueError(phase)


def top_functions(raw_path: str, n: int = 15) -> tuple[list, list, int]:
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            c = int(count)
            total += c
            frames = stack.split(";")
            own[frames[-1]] += c
            for fr in set(frames):
                incl[fr] += c
    return own.most_common(n), incl.most_common(n), total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["connect", "rtt", "upload", "download"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--size-mib", type=int, default=64, help="bytes per upload/download op")
    parser.add_argument("--out", default=None)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--no-sampler", action="store_true", help="only the CPU figures, no py-spy or perf")
    parser.add_argument("--perf", action="store_true",
                        help="sample with perf (kernel and native frames) instead of py-spy")
    args = parser.parse_args(argv)

    out = args.out or tempfile.mkdtemp(prefix="chuantou-profile-")
    os.makedirs(out, exist_ok=True)
    procs = br.Procs(out)
    spies = []
    try:
        env = br.build(procs, want_socat=False)
        pids = env["pids"]
        size = args.size_mib * 1024 * 1024
        # warm up
        for _ in range(3):
            br.connect_times(env["tunnel"]["echo"], 1)
        pyspy = None if args.no_sampler else shutil.which("py-spy")
        perf = shutil.which("perf") if args.perf else None
        perf_data = os.path.join(out, "perf.data")
        if perf:
            spies.append(subprocess.Popen(
                [perf, "record", "-F", "999", "-g", "-o", perf_data, "-p", ",".join(str(p) for p in pids.values()),
                 "--", "sleep", str(args.seconds + 1.5)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        elif pyspy:
            for role, pid in pids.items():
                cmd = [pyspy, "record", "-p", str(pid), "-d", str(int(args.seconds) + 2), "-r", str(args.rate),
                       "-f", "raw", "-o", os.path.join(out, f"{role}.txt"), "--gil"]
                if args.native:
                    cmd.append("--native")
                spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        cpu0 = {r: user_sys(p) for r, p in pids.items()}
        ops = 0
        t0 = time.monotonic()
        end = t0 + args.seconds
        if args.phase == "rtt":
            s = br._connect(env["tunnel"]["echo"])
            try:
                while time.monotonic() < end:
                    for _ in range(1000):
                        s.send(b"x")
                        s.recv(1)
                    ops += 1000
            finally:
                s.close()
        else:
            while time.monotonic() < end:
                one_op(args.phase, env, size)
                ops += 1
        wall = time.monotonic() - t0
        cpu1 = {r: user_sys(p) for r, p in pids.items()}
        unit = "MiB" if args.phase in ("upload", "download") else "op"
        per = ops * (args.size_mib if unit == "MiB" else 1)
        print(f"{args.phase}: {ops} ops in {wall:.1f} s ({per / wall:.1f} {unit}/s)")
        total = 0.0
        for r in pids:
            user = cpu1[r][0] - cpu0[r][0]
            system = cpu1[r][1] - cpu0[r][1]
            used = user + system
            total += used
            print(f"  {r:6s} CPU {used:.2f} s = {100 * used / wall:.0f}% of a core, "
                  f"{1e6 * used / per:.1f} µs per {unit} (user {1e6 * user / per:.1f}, system {1e6 * system / per:.1f})")
        print(f"  all three: {1e6 * total / per:.1f} µs CPU per {unit}")
        for spy in spies:
            spy.wait(timeout=60)
        if perf:
            for sort in ("comm,dso", "comm,sym"):
                rep = subprocess.run([perf, "report", "-i", perf_data, "--stdio", "--no-children", "-g", "none",
                                      "--percent-limit", "0.7", "--sort", sort],
                                     capture_output=True, text=True, timeout=120)
                print(f"\n== perf, by {sort}")
                print("\n".join(l for l in rep.stdout.splitlines() if l.strip() and not l.startswith("#")))
        for role in pids:
            path = os.path.join(out, f"{role}.txt")
            if not os.path.exists(path):
                continue
            own, incl, n = top_functions(path)
            print(f"\n== {role}: {n} samples; own time")
            for fr, c in own:
                print(f"  {100 * c / max(1, n):5.1f}%  {fr}")
            print(f"-- {role}: inclusive")
            for fr, c in incl:
                print(f"  {100 * c / max(1, n):5.1f}%  {fr}")
        print(f"\nraw stacks in {out}")
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.terminate()
                spy.wait(10)
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
