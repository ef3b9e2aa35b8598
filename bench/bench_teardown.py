"""Mass teardown figure (issue 10 item 4): N joined TCP sessions through a relay in this process,
clients A and B in subprocesses; A (the gateway holding the users' connections) is killed with SIGKILL and we measure how long the relay takes
to forget every session, its CPU time meanwhile, and the longest stall a 10 ms ticker thread of
the relay's process saw (starvation of other threads).

    python bench/bench_teardown.py 500 2000
    CHUANTOU_LIB=/path/to/other/tree python bench/bench_teardown.py 2000   (another copy of the library)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

LIBRARY = os.environ.get("CHUANTOU_LIB") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, LIBRARY)

from chuantou_server import Server  # noqa: E402

try:  # as the CLIs do (an older copy of the library has no such function)
    from common.threads import tune_for_many_threads  # noqa: E402
except ImportError:
    tune_for_many_threads = None  # type: ignore[assignment]

CHILD = r"""
import socket, sys, threading, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
import inspect
from chuantou_client import Client
try:
    from common.threads import tune_for_many_threads
    tune_for_many_threads()
except ImportError:
    pass
role, url = sys.argv[1], sys.argv[2]
burst = {"max_pending_connects": 100000} if "max_pending_connects" in inspect.signature(Client).parameters else {}
if "path" in inspect.signature(Client).parameters:
    burst["path"] = "relay"  # the relay's teardown is measured: on one host sessions would go direct
client = Client(url, role, token=None, **burst).start()  # the bench opens every session at once
if role == "B":
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    def echo(conn):
        while True:
            data = conn.recv(65536)
            if not data:
                return conn.close()
            conn.sendall(data)
    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    print(listener.getsockname()[1], flush=True)
else:
    proxy = client.create_proxy(0, "B", int(sys.argv[3]), protocol="tcp")
    print(proxy.local_port, flush=True)
threading.Event().wait()
"""


def child(role: str, url: str, *args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, role, url, *args], stdout=subprocess.PIPE, text=True,
                            cwd=LIBRARY)
    return proc, int(proc.stdout.readline())


def ticker(stop: threading.Event, worst: list) -> None:
    last = time.monotonic()
    while not stop.wait(0.01):
        now = time.monotonic()
        worst[0] = max(worst[0], now - last - 0.01)
        last = now


def run(n: int) -> dict:
    caps = {"max_sessions_per_client": n + 10, "max_pending_sessions_per_client": n, "max_sessions": n + 10,
            "max_sessions_per_target": n + 10}
    try:  # the settings are ServerConfig's fields; an older copy takes them as Server's parameters
        from chuantou_server import ServerConfig
        accepted = {f.name for f in dataclasses.fields(ServerConfig)}
    except ImportError:
        accepted = set(inspect.signature(Server).parameters)  # an older copy of the library has fewer caps
    relay = Server(host="127.0.0.1", port=0, heartbeat_timeout=30,
                   **{k: v for k, v in caps.items() if k in accepted}).start()
    url = f"ws://127.0.0.1:{relay.port}"
    b, echo_port = child("B", url)
    a, proxy_port = child("A", url, str(echo_port))
    users = []
    try:
        for _ in range(n):
            user = socket.create_connection(("127.0.0.1", proxy_port), timeout=30)
            user.sendall(b"x")
            users.append(user)
        for user in users:
            assert user.recv(1) == b"x"
        assert len(relay.sessions) == n, len(relay.sessions)
        stop, worst = threading.Event(), [0.0]
        tick = threading.Thread(target=ticker, args=(stop, worst), name="bench-ticker")
        tick.start()
        cpu0, t0 = time.process_time(), time.monotonic()
        a.send_signal(signal.SIGKILL)
        while len(relay.sessions) and time.monotonic() - t0 < 120:
            time.sleep(0.005)
        elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
        stop.set()
        tick.join()
        return {"sessions": n, "teardown_s": round(elapsed, 3), "relay_cpu_s": round(cpu, 3),
                "worst_stall_ms": round(worst[0] * 1000, 1), "left": len(relay.sessions)}
    finally:
        for user in users:
            user.close()
        for proc in (a, b):
            proc.kill()
            proc.wait()
        relay.stop()


if __name__ == "__main__":
    if tune_for_many_threads is not None:
        tune_for_many_threads()
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    for count in map(int, sys.argv[1:] or ["500", "2000"]):
        print(run(count), flush=True)
