"""UDP round trips through the tunnel beside socat's three UDP hops and the service directly
(issue 13): with W datagrams kept in flight (windows 1, 16 and 64) of 64 and 1,400 bytes, how
many round trips complete per second, and how many datagrams are lost.

    python bench/bench_udp.py [--quick] [--seconds S] [--json FILE]

The tunnel's flow goes through the relay (``roles.py client --path relay``): on one host a
direct path would bypass it. A datagram unanswered for 0.2 s counts as lost and is replaced,
so a loss costs the window a slot for that long. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_relay import HOST, Procs, build, free_port, write_json  # noqa: E402

WINDOWS = (1, 16, 64)
SIZES = (64, 1400)
LOST_AFTER = 0.2
TARGET_VS_SOCAT = 1.5
SEQ = struct.Struct("!q")


def socat_udp_chain(procs: Procs, target: int) -> int | None:
    """Three socat UDP hops in front of ``target``; the first hop's port, or None without socat."""
    socat = shutil.which("socat")
    if not socat:
        return None
    ports = [free_port() for _ in range(3)]
    chain = ports + [target]
    for i in range(3):
        procs.start(f"socat-udp{i + 1}", [socat, "-T", "30", f"UDP4-LISTEN:{chain[i]},bind={HOST},reuseaddr,fork",
                                          f"UDP4:{HOST}:{chain[i + 1]}"], expect_ready=False)
    return ports[0]


def _open(port: int, size: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        s.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
    s.connect((HOST, port))
    pad = b"\0" * (size - SEQ.size)
    s.settimeout(0.2)
    deadline = time.monotonic() + 15.0
    while True:  # the first datagram opens the flow (socat forks, the tunnel sets up a session)
        if time.monotonic() > deadline:
            s.close()
            raise RuntimeError(f"no UDP echo from port {port} within 15 s")
        try:
            s.send(SEQ.pack(-1) + pad)
            if s.recv(65536)[:SEQ.size] == SEQ.pack(-1):
                break
        except (socket.timeout, ConnectionRefusedError):
            continue
    s.settimeout(0.01)
    while True:  # stray warm-up echoes
        try:
            s.recv(65536)
        except (socket.timeout, ConnectionRefusedError):
            break
    return s


def windowed(port: int, window: int, size: int, seconds: float) -> dict:
    """Keep ``window`` datagrams in flight for ``seconds``; count completed round trips and losses."""
    s = _open(port, size)
    pad = b"\0" * (size - SEQ.size)
    pack, unpack = SEQ.pack, SEQ.unpack_from
    outstanding: dict[int, float] = {}
    seq = done = lost = 0
    clock = time.perf_counter
    s.settimeout(LOST_AFTER / 4)
    start = clock()
    end = start + seconds
    try:
        while True:
            now = clock()
            if now >= end:
                break
            while len(outstanding) < window:
                s.send(pack(seq) + pad)
                outstanding[seq] = now
                seq += 1
            try:
                data = s.recv(65536)
            except (socket.timeout, ConnectionRefusedError):
                data = b""
            if data:
                if outstanding.pop(unpack(data)[0], None) is not None:
                    done += 1
                continue
            cutoff = clock() - LOST_AFTER
            for old in [k for k, t in outstanding.items() if t < cutoff]:
                del outstanding[old]
                lost += 1
    finally:
        s.close()
    elapsed = clock() - start
    sent = seq
    return {"round_trips_per_s": round(done / elapsed), "sent": sent, "lost": lost,
            "loss_pct": round(100.0 * lost / max(1, sent), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="chuantou: UDP round trips at a window (loopback only)")
    parser.add_argument("--quick", action="store_true", help="0.5 s per figure")
    parser.add_argument("--seconds", type=float, help="seconds per figure (default 3)")
    parser.add_argument("--json", metavar="FILE", help="write the figures to FILE")
    args = parser.parse_args(argv)
    seconds = args.seconds or (0.5 if args.quick else 3.0)
    results: dict = {"seconds_each": seconds, "loadavg_start": os.getloadavg(), "figures": []}
    procs = Procs(tempfile.mkdtemp(prefix="chuantou-udp-"))
    try:
        env = build(procs, False)
        paths = {"direct": env["direct"]["echo"], "tunnel": env["tunnel"]["echo"]}
        socat = socat_udp_chain(procs, env["direct"]["echo"])
        if socat:
            paths["socat"] = socat
        print(f"UDP round trips, {seconds:g} s each, load average %.2f %.2f %.2f" % results["loadavg_start"])
        print(f"  {'size':>5s} {'window':>6s}  " + "  ".join(f"{label:>16s}" for label in paths) + "   tunnel/socat")
        for size in SIZES:
            for window in WINDOWS:
                row = {label: windowed(port, window, size, seconds) for label, port in paths.items()}
                ratio = (row["tunnel"]["round_trips_per_s"] / max(1, row["socat"]["round_trips_per_s"])
                         if "socat" in row else None)
                results["figures"].append({"size": size, "window": window, **row, "tunnel_vs_socat": ratio})
                cells = "  ".join(f"{r['round_trips_per_s']:>8d}/s {r['loss_pct']:5.2f}%" for r in row.values())
                verdict = "" if ratio is None else (
                    f"   {ratio:.2f}x {'PASS' if ratio >= TARGET_VS_SOCAT and row['tunnel']['loss_pct'] < 1 else 'MISS'}")
                print(f"  {size:>5d} {window:>6d}  {cells}{verdict}")
    finally:
        procs.stop_all()
    results["loadavg_end"] = os.getloadavg()
    print(f"target: tunnel >= {TARGET_VS_SOCAT}x socat's three hops, under 1 %% loss; load average at end "
          "%.2f %.2f %.2f" % results["loadavg_end"])
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
