"""A third party on the public network that forges datagrams to a client's punched NAT mapping,
with the source address of the peer's mapping (a raw socket, IP_HDRINCL): the only way a
stranger's datagram passes an address-and-port-dependent NAT and reaches the flow's socket as if
it came from the peer. It also sends a few from its own address, which the NAT should filter.

    ip netns exec NS python tests/forge_support.py --to IP:PORT --as IP:PORT [--count N]

Prints one JSON line: what it sent. Runs once and exits (it needs root, as the namespaces do).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import direct as d  # noqa: E402


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4 header and a UDP datagram from ``src`` to ``dst`` (checksums included)."""
    saddr, daddr = socket.inet_aton(src[0]), socket.inet_aton(dst[0])
    length = 8 + len(payload)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    header = struct.pack("!HHHH", src[1], dst[1], length, 0)
    udp_sum = checksum(pseudo + header + payload) or 0xFFFF
    udp = struct.pack("!HHHH", src[1], dst[1], length, udp_sum) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + udp


def forgeries(count: int) -> list[bytes]:
    """What a stranger can make without the session's keys: datagrams shaped as sealed ones
    (counter, ciphertext, tag: random), and punch packets with a key of its own."""
    sealed_like = [bytes(1) + os.urandom(7) + os.urandom(64 + i) for i in range(count)]
    punches = [d.pack_punch(os.urandom(16), kind, "B", os.urandom(16).hex(), d.new_punch_nonce())
               for kind in (d.PING, d.PONG)]
    return sealed_like + punches


def parse(text: str) -> tuple[str, int]:
    return d.parse_candidate(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--to", type=parse, required=True, help="the victim's punched mapping")
    parser.add_argument("--as", dest="spoof", type=parse, required=True, help="the peer's mapping, as the source")
    parser.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    spoofed = forgeries(args.count)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for payload in spoofed:
            raw.sendto(udp_packet(args.spoof, args.to, payload), (args.to[0], 0))
    plain = forgeries(args.count)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as own:  # from this host's own address
        for payload in plain:
            own.sendto(payload, args.to)
    print(json.dumps({"spoofed": len(spoofed), "sealedLike": args.count, "plain": len(plain)}), flush=True)


if __name__ == "__main__":
    main()
