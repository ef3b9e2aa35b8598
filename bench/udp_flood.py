"""Loss of a live UDP flow while one address floods the relay with registration-shaped datagrams.

The relay runs in a process of its own, the flooder (127.0.0.2, FLOOD_RATE datagrams/s, default
92,000) in another; clients A and B, the echo service and the user (1,000 datagrams/s for 4 s)
in this one. Run from the repository root: python bench/udp_flood.py"""
import os, socket, sys, threading, time
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
from chuantou_client import Client
from helpers import UdpEchoService, udp_roundtrip
from common import frames

NEW = hasattr(frames, "UDP_REGISTER_SIZE")
import subprocess
PORT = int(os.environ.get("RELAY_PORT", "47311"))
relay_proc = subprocess.Popen([sys.executable, "-c", f"""
import sys, time, threading, logging; sys.path.insert(0, {os.getcwd()!r})
logging.basicConfig(level=logging.WARNING)
from chuantou_server import Server
s = Server(host="127.0.0.1", port={PORT}).start()
print("up", flush=True)
sys.stdin.read()
print("limits:", getattr(getattr(s.udp, "limits", None), "counts", None), flush=True)
s.stop()
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
relay_proc.stdout.readline()
class R: port = PORT
relay = R()
a = Client(f"ws://127.0.0.1:{relay.port}", "A").start()
b = Client(f"ws://127.0.0.1:{relay.port}", "B").start()
echo = UdpEchoService().start()
time.sleep(1)
proxy = a.create_proxy(0, "B", echo.port, protocol="udp")
user = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); user.bind(("127.0.0.1", 0))
user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
assert udp_roundtrip(user, proxy.local_port, b"warm") == b"warm"
join = frames.JoinRequest("A", os.urandom(16).hex(), os.urandom(16).hex())  # an unknown session: acked at once
hello = frames.pack_udp_register(join)
RUNS = [0]


def run(seconds, rate=1000):
    """Send ``rate`` numbered datagrams a second; count the echoes of this run that come back."""
    RUNS[0] += 1
    tag = bytes([RUNS[0]])
    got = set(); done = threading.Event()
    def rx():
        user.settimeout(0.5)
        while not done.is_set():
            try:
                data = user.recv(2000)
            except socket.timeout:
                continue
            if data[:1] == tag:
                got.add(data[1:9])
    t = threading.Thread(target=rx, name="chuantou-bench-rx"); t.start()
    n = int(seconds * rate); start = time.monotonic()
    for i in range(n):
        user.sendto(tag + i.to_bytes(8, "big") + b"x" * 191, ("127.0.0.1", proxy.local_port))
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0: time.sleep(delay)
    time.sleep(2.0); done.set(); t.join()
    return n, len(got)


n, got = run(4)
print(f"no flood: {n - got}/{n} lost")
import subprocess
code = f"""
import socket, time
f = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); f.bind(("127.0.0.2", 0)); f.setblocking(False)
hello = bytes.fromhex("{hello.hex()}"); n = 0; start = time.monotonic(); end = start + 5.5
RATE = {int(os.environ.get("FLOOD_RATE", "92000"))}
while time.monotonic() < end:
    ahead = start + n / RATE - time.monotonic()
    if ahead > 0: time.sleep(ahead)
    for _ in range(100):
        try: f.sendto(hello, ("127.0.0.1", {relay.port})); n += 1
        except OSError: pass
    try:
        while True: f.recv(100)
    except OSError: pass
print(n)
"""
flooder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
time.sleep(0.5)
n, got = run(4)
rate = int(flooder.communicate()[0]) / 5.5
print(f"flood {rate:,.0f}/s from 127.0.0.2 ({'new' if NEW else 'old'} code): {n - got}/{n} lost ({100*(n-got)/n:.1f}%)")
proxy.close(); a.stop(); b.stop(); echo.stop()
print(relay_proc.communicate("")[0].strip())
