"""Sealed sessions against the unsealed tunnel, side by side in one run (issue 12's targets).

    python bench/bench_sealed.py [--quick] [--size-mib N] [--connects N] [--udp-seconds S]
                                 [--udp-rate N] [--json FILE]

Starts, as separate processes (bench/roles.py): the service, one relay, and two pairs of
clients on it: A -> B sealed (as every session now is) and A0 -> B0 unsealed (both started
with ``--unsealed``: they register no key, as an older chuantou, so nothing is sealed).
Then measures on each tunnel, taking turns so both see the same machine state:

1. one-stream throughput, MB/s, A->B (upload to the sink) and B->A (download from the source),
   with CPU seconds per GiB in A and in B for each;
2. setup: new connection to the first echoed byte, ms (median, p99);
3. UDP: 64-byte datagrams as fast as a window of 256 unanswered allows, echoed datagrams per
   second, with CPU seconds per million datagrams in A and in B.

It prints the figures and the ratios against the targets (sealed >= 0.7x unsealed throughput
each way and UDP pps; setup median <= unsealed + 1 ms); it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import bench_relay as br  # noqa: E402 (the shared process and measurement helpers)

TUNNELS = ("sealed", "unsealed")
TARGETS = {"throughput_ratio": 0.7, "setup_extra_ms": 1.0, "udp_ratio": 0.7}


def build(procs: br.Procs) -> dict:
    """The service, the relay, and the two client pairs with proxies to the service's ports."""
    py = sys.executable
    _, lines = procs.start("service", [py, br.ROLES, "service"])
    echo, source, sink = (int(x) for x in lines[-1].split()[1:4])
    _, lines = procs.start("server", [py, br.ROLES, "server"])
    url = f"ws://{br.HOST}:{int(lines[-1].split()[1])}"
    env = {}
    for tunnel, a_id, b_id, extra in (("sealed", "A", "B", []), ("unsealed", "A0", "B0", ["--unsealed"])):
        b_proc, _ = procs.start(f"client{b_id}", [py, br.ROLES, "client", "--server", url, "--id", b_id, *extra])
        a_proc, lines = procs.start(f"client{a_id}", [
            py, br.ROLES, "client", "--server", url, "--id", a_id, *extra,
            "--proxy", f"echo:{b_id}:{echo}:both", "--proxy", f"source:{b_id}:{source}:tcp",
            "--proxy", f"sink:{b_id}:{sink}:tcp",
        ])
        proxies = {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("PROXY ")}
        env[tunnel] = {"ports": proxies, "A": a_proc.pid, "B": b_proc.pid}
    return env


def _cpu(env: dict) -> tuple[float, float]:
    return br.cpu_seconds([env["A"]]), br.cpu_seconds([env["B"]])


def throughput(env: dict, size: int, direction: str) -> dict:
    a0, b0 = _cpu(env)
    if direction == "a_to_b":
        seconds = br.upload(env["ports"]["sink"], size)
    else:
        seconds = br.download(env["ports"]["source"], size)
    a1, b1 = _cpu(env)
    gib = size / br.GIB
    return {"mb_s": size / seconds / br.MB, "cpu_a_s_per_gib": (a1 - a0) / gib, "cpu_b_s_per_gib": (b1 - b0) / gib}


def udp_pps(env: dict, rate: int, seconds: float) -> dict:
    a0, b0 = _cpu(env)
    run = br.udp_run(env["ports"]["echo"], rate, seconds, window=256)
    a1, b1 = _cpu(env)
    millions = max(1, run["received"]) / 1e6
    return {"pps": run["received"] / seconds, "loss_pct": run["loss_pct"],
            "cpu_a_s_per_mdgram": (a1 - a0) / millions, "cpu_b_s_per_mdgram": (b1 - b0) / millions}


def best(samples: list[dict], key: str) -> dict:
    return max(samples, key=lambda s: s[key])


def run(args) -> dict:
    size = (args.size_mib or (16 if args.quick else 128)) * 1024 * 1024
    connects = args.connects or (100 if args.quick else 400)
    udp_seconds = args.udp_seconds or (1.0 if args.quick else 3.0)
    repeats = 1 if args.quick else 3
    logdir = tempfile.mkdtemp(prefix="chuantou-bench-sealed-")
    procs = br.Procs(logdir)
    results: dict = {"config": {"bytes": size, "connects": connects, "udp_seconds": udp_seconds,
                                "udp_rate": args.udp_rate, "repeats": repeats, "logs": logdir}}
    try:
        env = build(procs)
        for tunnel in TUNNELS:  # warm up: the first session of each pair pins keys, starts threads
            br.connect_times(env[tunnel]["ports"]["echo"], 5)
        raw: dict = {t: {"a_to_b": [], "b_to_a": [], "setup": [], "udp": []} for t in TUNNELS}
        for _ in range(repeats):  # the tunnels take turns, so that each sees the same machine state
            for tunnel in TUNNELS:
                raw[tunnel]["a_to_b"].append(throughput(env[tunnel], size, "a_to_b"))
                raw[tunnel]["b_to_a"].append(throughput(env[tunnel], size, "b_to_a"))
            for tunnel in TUNNELS:
                raw[tunnel]["setup"] += br.connect_times(env[tunnel]["ports"]["echo"], connects // repeats)
            for tunnel in TUNNELS:
                raw[tunnel]["udp"].append(udp_pps(env[tunnel], args.udp_rate, udp_seconds))
        for tunnel in TUNNELS:
            r = raw[tunnel]
            results[tunnel] = {
                "a_to_b": best(r["a_to_b"], "mb_s"),
                "b_to_a": best(r["b_to_a"], "mb_s"),
                "setup_median_ms": statistics.median(r["setup"]),
                "setup_p99_ms": br.pct(r["setup"], 99),
                "udp": best(r["udp"], "pps"),
            }
    finally:
        procs.stop_all()
    s, u = results["sealed"], results["unsealed"]
    results["ratios"] = {
        "a_to_b": s["a_to_b"]["mb_s"] / u["a_to_b"]["mb_s"],
        "b_to_a": s["b_to_a"]["mb_s"] / u["b_to_a"]["mb_s"],
        "setup_extra_ms": s["setup_median_ms"] - u["setup_median_ms"],
        "udp": s["udp"]["pps"] / max(1e-9, u["udp"]["pps"]),
    }
    return results


def report(results: dict) -> None:
    s, u, ratio = results["sealed"], results["unsealed"], results["ratios"]
    rows = [("", "sealed", "unsealed", "sealed/unsealed", "target")]
    for key, label in (("a_to_b", "throughput A->B, MB/s"), ("b_to_a", "throughput B->A, MB/s")):
        rows.append((label, f"{s[key]['mb_s']:.0f}", f"{u[key]['mb_s']:.0f}", f"{ratio[key]:.2f}x",
                     _verdict(ratio[key] >= TARGETS["throughput_ratio"], ">= 0.7x")))
        for side in ("a", "b"):
            field = f"cpu_{side}_s_per_gib"
            rows.append((f"  CPU in {side.upper()}, s/GiB", f"{s[key][field]:.2f}", f"{u[key][field]:.2f}", "", ""))
    rows.append(("setup median, ms", f"{s['setup_median_ms']:.2f}", f"{u['setup_median_ms']:.2f}",
                 f"+{ratio['setup_extra_ms']:.2f} ms",
                 _verdict(ratio["setup_extra_ms"] <= TARGETS["setup_extra_ms"], "<= +1 ms")))
    rows.append(("setup p99, ms", f"{s['setup_p99_ms']:.2f}", f"{u['setup_p99_ms']:.2f}", "", ""))
    rows.append(("UDP echoed datagrams/s", f"{s['udp']['pps']:.0f}", f"{u['udp']['pps']:.0f}", f"{ratio['udp']:.2f}x",
                 _verdict(ratio["udp"] >= TARGETS["udp_ratio"], ">= 0.7x")))
    rows.append(("  UDP loss, %", f"{s['udp']['loss_pct']:.2f}", f"{u['udp']['loss_pct']:.2f}", "", ""))
    for side in ("a", "b"):
        field = f"cpu_{side}_s_per_mdgram"
        rows.append((f"  CPU in {side.upper()}, s per 1e6 datagrams", f"{s['udp'][field]:.1f}",
                     f"{u['udp'][field]:.1f}", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"(logs in {results['config']['logs']})")


def _verdict(ok: bool, target: str) -> str:
    return f"{target} {'met' if ok else 'MISSED'}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one round (about 20 s)")
    parser.add_argument("--size-mib", type=int, help="bytes per throughput run (default 128, quick 16)")
    parser.add_argument("--connects", type=int, help="new connections timed per tunnel (default 400, quick 100)")
    parser.add_argument("--udp-seconds", type=float, help="seconds of UDP per round (default 3, quick 1)")
    parser.add_argument("--udp-rate", type=int, default=200_000, help="datagrams/s offered (the window bounds it)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = run(args)
    report(results)
    print(f"run took {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
