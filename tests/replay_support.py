"""An on-path observer of a direct UDP path (issue 15): it records genuine punch packets as they
cross the public network, and later replays them with the peer's address as their source (a raw
socket, as tests/forge_support.py sends its forgeries). Run in the public namespace::

    ip netns exec NS python tests/replay_support.py capture --a IP:PORT --b IP:PORT [--timeout S]
    ip netns exec NS python tests/replay_support.py replay --packets JSON [--every S] [--for S]

``capture`` prints one JSON line {"a->b": {"P": hex, "O": hex}, "b->a": {...}} once it has seen a
ping and a pong each way between the two NAT mappings (or exits 1 at the timeout). ``replay``
sends each recorded packet from its original source to its original destination every
``--every`` seconds until ``--for`` is over (or it is terminated), then prints {"sent": N}.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from forge_support import udp_packet  # noqa: E402

from common import direct as d  # noqa: E402

ETH_P_ALL = 0x0003


def _udp_of(frame: bytes) -> tuple[tuple[str, int], tuple[str, int], bytes] | None:
    """(src, dst, payload) of an Ethernet frame carrying IPv4 UDP, else None."""
    if len(frame) < 14 + 20 + 8 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4:
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != socket.IPPROTO_UDP:
        return None
    src_ip, dst_ip = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    udp = frame[14 + ihl:]
    src_port, dst_port, length = struct.unpack("!HHH", udp[:6])
    return (src_ip, src_port), (dst_ip, dst_port), udp[8:length]


def capture(a: tuple[str, int], b: tuple[str, int], timeout: float) -> dict:
    seen: dict[str, dict[str, str]] = {"a->b": {}, "b->a": {}}
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)) as sniffer:
        while any(len(kinds) < 2 for kinds in seen.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit(f"captured only {seen}")
            sniffer.settimeout(remaining)
            try:
                frame = sniffer.recv(65535)
            except socket.timeout:
                continue
            parsed = _udp_of(frame)
            if parsed is None:
                continue
            src, dst, payload = parsed
            direction = {(a, b): "a->b", (b, a): "b->a"}.get((src, dst))
            if direction is None or len(payload) != d.PUNCH_SIZE or payload[:2] != d.PUNCH_MAGIC:
                continue
            seen[direction].setdefault(payload[2:3].decode(), payload.hex())
    return seen


def replay(packets: dict, a: tuple[str, int], b: tuple[str, int], every: float, duration: float) -> int:
    ends = {"a->b": (a, b), "b->a": (b, a)}
    datagrams = [udp_packet(*ends[direction], bytes.fromhex(packet))
                 for direction, kinds in packets.items() for packet in kinds.values()]
    stop = time.monotonic() + duration
    sent = 0
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            while time.monotonic() < stop:
                for datagram in datagrams:
                    dst = socket.inet_ntoa(datagram[16:20])
                    raw.sendto(datagram, (dst, 0))
                    sent += 1
                time.sleep(every)  # the attacker's pace, not synchronisation
    except KeyboardInterrupt:
        pass
    return sent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("capture", "replay"))
    parser.add_argument("--a", type=d.parse_candidate, required=True, help="A's NAT mapping")
    parser.add_argument("--b", type=d.parse_candidate, required=True, help="B's NAT mapping")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--packets", help="capture's output")
    parser.add_argument("--every", type=float, default=0.1)
    parser.add_argument("--for", dest="duration", type=float, default=30.0)
    args = parser.parse_args()
    if args.mode == "capture":
        print(json.dumps(capture(args.a, args.b, args.timeout)), flush=True)
    else:
        sent = replay(json.loads(args.packets), args.a, args.b, args.every, args.duration)
        print(json.dumps({"sent": sent}), flush=True)


if __name__ == "__main__":
    main()
