"""Sessions at scale (issue 13): hold N simultaneous TCP sessions through one relay, then churn
through M sequential ones, with the memory and threads of the three processes sampled.

    python bench/bench_scale.py                 9,000 held, 20,000 churned
    python bench/bench_scale.py --quick         500 held, 1,000 churned (a smoke run)
    python bench/bench_scale.py --hold 9000 --churn 0 --json FILE

Prints, beside the targets of issue 13: sessions served and dropped while all are open, the time
to open them all, RSS per open session over relay + A + B and the relay's share, memory and
threads after they close against idle, and the RSS/thread samples over the churn (flat or not).
Every session is a thread pair in each of the three processes (thread-per-connection), so the
machine needs about 6 threads per held session: as root the bench raises kernel.pid_max when it
is lower, and says so. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_relay import (  # noqa: E402
    Procs, _connect, _exchange_all, build, print_summary, rss_kib, threads_of, write_json,
)

TARGETS = {"rss_per_session_kib": 96.0, "relay_rss_per_session_kib": 32.0, "open_seconds": 20.0,
           "after_close_ratio": 1.10, "churn_drift_ratio": 1.10}
THREADS_PER_SESSION = 6  # a pump pair in each of relay, A and B
PID_MAX = "/proc/sys/kernel/pid_max"
AFTER_CLOSE = 10.0  # memory "after close" is read this long after the last session closed


def make_room(sessions: int) -> list[str]:
    """Descriptors and kernel thread ids enough for ``sessions``; returns what was changed."""
    notes = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = sessions * THREADS_PER_SESSION + sessions + 10_000  # + the service's thread per session
    try:
        with open(PID_MAX) as f:
            current = int(f.read())
        if current < need:
            with open(PID_MAX, "w") as f:
                f.write(str(max(need, 4_194_304 if need > 32768 else need)))
            notes.append(f"kernel.pid_max raised from {current} (threads need pids)")
    except OSError as exc:
        notes.append(f"kernel.pid_max not raised ({exc.strerror}): more than ~{current // 7} sessions may fail")
    return notes


def sample(pids: dict[str, int]) -> dict:
    return {name: {"rss_kib": rss_kib(pid), "threads": threads_of(pid)} for name, pid in pids.items()}


def settle(pids: dict[str, int], idle: dict, timeout: float = 60.0) -> tuple[dict, float]:
    """Wait (polling, with a deadline) until every process's threads are back within 10 % of idle."""
    t0 = time.monotonic()
    while True:
        now = sample(pids)
        back = all(now[n]["threads"] <= idle[n]["threads"] * TARGETS["after_close_ratio"] + 2 for n in pids)
        if back or time.monotonic() - t0 > timeout:
            return now, time.monotonic() - t0
        time.sleep(0.2)


def hold(echo_port: int, count: int, pids: dict[str, int], batch: int = 200) -> dict:
    """Open ``count`` echoing sessions in batches, then echo again on all of them while all are open."""
    idle = sample(pids)
    socks: dict[int, socket.socket] = {}
    failed_open = 0
    served_first: set[int] = set()
    t0 = time.monotonic()
    try:
        for start in range(0, count, batch):
            new = {}
            for i in range(start, min(count, start + batch)):
                try:
                    new[i] = _connect(echo_port, timeout=20.0)
                    new[i].setblocking(False)
                except OSError:
                    failed_open += 1
            served_first |= _exchange_all(new, lambda i: b"hello %06d\n" % i, timeout=30.0)
            socks.update(new)
            if time.monotonic() - t0 > 300:
                break
        open_seconds = time.monotonic() - t0
        during = sample(pids)
        served_second = _exchange_all(socks, lambda i: b"again %06d\n" % i, timeout=60.0)
    finally:
        for s in socks.values():
            s.close()
    closed_at = time.monotonic()
    _, settle_seconds = settle(pids, idle)
    time.sleep(max(0.0, closed_at + AFTER_CLOSE - time.monotonic()))  # a fixed window: the clients trim on their 5 s tick
    after = sample(pids)
    served = served_first & served_second
    per = {n: (during[n]["rss_kib"] - idle[n]["rss_kib"]) / max(1, count) for n in pids}
    return {
        "requested": count, "opened": len(socks), "failed_open": failed_open, "served_all_open": len(served),
        "dropped": count - len(served), "open_seconds": round(open_seconds, 2),
        "idle": idle, "during": during, "after_close": after, "settle_seconds": round(settle_seconds, 2),
        "rss_per_session_kib": round(sum(per.values()), 1), "rss_per_session_by_process_kib": {
            n: round(v, 1) for n, v in per.items()},
    }


def churn(echo_port: int, count: int, pids: dict[str, int], workers: int = 8, samples: int = 10) -> dict:
    """``count`` sessions one after another (``workers`` at a time): connect, echo, close; sample
    memory and threads after every tenth of them."""
    done = [0]
    failed = [0]
    lock = threading.Lock()
    taken = iter(range(count))
    marks: list[dict] = []
    every = max(1, count // samples)

    def work() -> None:
        while True:
            with lock:
                i = next(taken, None)
            if i is None:
                return
            try:
                s = _connect(echo_port, timeout=20.0)
                try:
                    s.sendall(b"x")
                    ok = s.recv(1) == b"x"
                finally:
                    s.close()
            except OSError:
                ok = False
            with lock:
                done[0] += 1
                failed[0] += not ok
                if done[0] % every == 0:
                    marks.append({"done": done[0], "t": round(time.monotonic() - t0, 2), **sample(pids)})

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, name=f"bench-churn-{k}") for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    total = [sum(m[n]["rss_kib"] for n in pids) for m in marks]
    base = total[min(1, len(total) - 1)] if total else 0  # after the first tenth: allocators warmed up
    return {"count": count, "failed": failed[0], "seconds": round(seconds, 2),
            "per_second": round(count / max(seconds, 1e-9), 1), "marks": marks,
            "rss_drift_ratio": round(total[-1] / base, 3) if base else None}


def summary(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []

    def add(name, value, target, ok):
        rows.append((name, value, target, "PASS" if ok else "MISS"))

    T = TARGETS
    if "hold" in results:
        h = results["hold"]
        add(f"{h['requested']} held, dropped", str(h["dropped"]), "0", h["dropped"] == 0)
        add("opening them all", f"{h['open_seconds']:.1f} s", f"< {T['open_seconds']:.0f} s",
            h["open_seconds"] < T["open_seconds"])
        add("RSS per open session", f"{h['rss_per_session_kib']:.1f} KiB", f"< {T['rss_per_session_kib']:.0f} KiB",
            h["rss_per_session_kib"] < T["rss_per_session_kib"])
        relay = h["rss_per_session_by_process_kib"]["server"]
        add("  the relay's share", f"{relay:.1f} KiB", f"< {T['relay_rss_per_session_kib']:.0f} KiB",
            relay < T["relay_rss_per_session_kib"])
        worst = max(h["after_close"][n]["rss_kib"] / h["idle"][n]["rss_kib"] for n in h["idle"])
        add("RSS after close / idle (worst)", f"{worst:.2f}x", f"<= {T['after_close_ratio']}x",
            worst <= T["after_close_ratio"])
        threads = max(h["after_close"][n]["threads"] / max(1, h["idle"][n]["threads"]) for n in h["idle"])
        add("threads after close / idle", f"{threads:.2f}x", f"<= {T['after_close_ratio']}x",
            threads <= T["after_close_ratio"])
    if "churn" in results and results["churn"]["rss_drift_ratio"] is not None:
        c = results["churn"]
        add(f"churn {c['count']}: failed", str(c["failed"]), "0", c["failed"] == 0)
        add("churn RSS last / first tenth", f"{c['rss_drift_ratio']:.2f}x", f"<= {T['churn_drift_ratio']}x",
            c["rss_drift_ratio"] <= T["churn_drift_ratio"])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="chuantou: sessions at scale (loopback only)")
    parser.add_argument("--quick", action="store_true", help="500 held, 1,000 churned")
    parser.add_argument("--hold", type=int, help="simultaneous sessions (default 9000, quick 500; 0: skip)")
    parser.add_argument("--churn", type=int, help="sequential sessions (default 20000, quick 1000; 0: skip)")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    args = parser.parse_args(argv)
    n_hold = args.hold if args.hold is not None else (500 if args.quick else 9000)
    n_churn = args.churn if args.churn is not None else (1000 if args.quick else 20000)
    results: dict = {"config": {"hold": n_hold, "churn": n_churn, "cpus": os.cpu_count()},
                     "notes": make_room(n_hold), "loadavg_start": os.getloadavg()}
    for note in results["notes"]:
        print(f"note: {note}")
    logdir = tempfile.mkdtemp(prefix="chuantou-scale-")
    procs = Procs(logdir)
    t_start = time.monotonic()
    try:
        env = build(procs, False, server_args=("--session-cap", str(max(n_hold, 100) + 100)))
        pids, echo = env["pids"], env["tunnel"]["echo"]
        print(f"sessions at scale: {os.cpu_count()} CPUs, logs in {logdir}, load average %.2f %.2f %.2f"
              % results["loadavg_start"])
        if n_hold:
            print(f"[1] {n_hold} simultaneous sessions")
            h = results["hold"] = hold(echo, n_hold, pids)
            for label in ("idle", "during", "after_close"):
                print(f"    {label:12s} " + "   ".join(
                    f"{n}: {h[label][n]['rss_kib'] / 1024:.1f} MiB, {h[label][n]['threads']} threads" for n in pids))
            print(f"    served {h['served_all_open']}/{n_hold} while all open, opened in {h['open_seconds']:.1f} s;"
                  f" per session: " + ", ".join(f"{n} {v:.1f} KiB" for n, v in h["rss_per_session_by_process_kib"].items())
                  + f"; threads back after {h['settle_seconds']:.1f} s")
        if n_churn:
            print(f"[2] {n_churn} sequential sessions (8 at a time)")
            c = results["churn"] = churn(echo, n_churn, pids)
            for m in c["marks"]:
                print(f"    {m['done']:6d} done  " + "   ".join(
                    f"{n}: {m[n]['rss_kib'] / 1024:.1f} MiB {m[n]['threads']} thr" for n in pids))
            print(f"    {c['per_second']:.0f} sessions/s, {c['failed']} failed")
    finally:
        procs.stop_all()
    results["seconds"] = round(time.monotonic() - t_start, 1)
    results["loadavg_end"] = os.getloadavg()
    rows = results["summary"] = summary(results)
    print_summary(rows, results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
