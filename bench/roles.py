"""Processes the benchmark starts: the relay server, a client (A or B), and the test service.

    python bench/roles.py server
    python bench/roles.py client --server ws://127.0.0.1:PORT --id A [--proxy NAME:TARGET_ID:PORT:PROTO ...]
                                 [--unsealed]
    python bench/roles.py service

Each prints what the parent needs on stdout (``PORT n``, ``PROXY name port``, ``PORTS ...``)
then ``READY``, and runs until SIGTERM (or stdin closing), then stops cleanly and exits.
Logs go to stderr at WARNING.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import struct
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BUF = 1024 * 1024
HOST = "127.0.0.1"


def _prepare_process() -> threading.Event:
    try:
        from common.threads import tune_for_many_threads
    except ImportError:  # an older copy of the library
        threading.stack_size(512 * 1024)
    else:
        tune_for_many_threads()  # as the CLIs do
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _wait(stop: threading.Event) -> None:
    # A safety net: never outlive the benchmark by more than an hour even if nobody signals us.
    stop.wait(3600)


def _maybe_profile():
    """BENCH_PROFILE_DIR=DIR runs the role under cProfile (every thread) and dumps DIR/ROLE-PID.prof on exit."""
    path = os.environ.get("BENCH_PROFILE_DIR")
    if not path:
        return None
    import cProfile
    import pstats
    profiles = []
    lock = threading.Lock()
    orig_run = threading.Thread.run

    def run(self):  # cProfile does not follow new threads by itself
        prof = cProfile.Profile()
        with lock:
            profiles.append(prof)
        prof.enable()
        try:
            orig_run(self)
        finally:
            prof.disable()

    threading.Thread.run = run

    def dump(role: str):
        with lock:
            done = list(profiles)
        stats = None
        for prof in done:
            try:
                prof.disable()
                stats = pstats.Stats(prof) if stats is None else stats.add(prof)
            except (TypeError, ValueError):  # a profile with no data yet
                pass
        if stats is not None:
            stats.dump_stats(os.path.join(path, f"{role}-{os.getpid()}.prof"))

    return dump


def _maybe_trace(role: str):
    """BENCH_TRACE_DIR=DIR records when each step of setting up a TCP session happens in this
    process (time.perf_counter_ns, one clock for all processes) and writes DIR/ROLE.trace on exit.
    Used by trace_connect.py; wraps library functions from outside, changes nothing in them."""
    path = os.environ.get("BENCH_TRACE_DIR")
    if not path:
        return None
    import functools
    import time

    events: list[tuple[int, str]] = []
    clock = time.perf_counter_ns

    def mark(name: str) -> None:
        events.append((clock(), name))

    def wrap(owner, attr: str, label, after: str | None = None):
        orig = getattr(owner, attr)

        @functools.wraps(orig)
        def wrapper(*args, **kwargs):
            name = label(*args, **kwargs) if callable(label) else label
            if name:
                mark(name)
            try:
                return orig(*args, **kwargs)
            finally:
                if after and name:
                    mark(after if not callable(label) else name + after)

        setattr(owner, attr, wrapper)

    from common import pipe, protocol
    wrap(pipe.Pipe, "run", "pipe_run")
    wrap(pipe.Pipe, "_pump", lambda self, src, dst, index, before=None: f"pump{index}_start")
    wrap(protocol, "decode", "decode", after="decode_done")
    if role == "server":
        from chuantou_server import listener, relay, signaling
        wrap(signaling.ControlConnection, "handle_frame", "frame")
        wrap(signaling.ControlConnection, "send", lambda self, msg: "send_" + msg.TYPE, after="_done")
        wrap(listener.Listener, "_dispatch", "dispatch_thread")
        wrap(listener, "serve_data_channel", "data_channel_header")
        wrap(relay, "run_relay", "relay_both_joined")
    else:
        from chuantou_client import client, control, proxy, sealing, target
        wrap(proxy.Proxy, "_serve_connection", "conn_thread")
        wrap(sealing.Sealing, "seal_a", "seal_a", after="seal_a_done")
        wrap(sealing.Sealing, "seal_b", "seal_b", after="seal_b_done")
        wrap(target, "_connect_service", "connect_service", after="connect_service_done")
        wrap(control.ControlChannel, "send", lambda self, msg: "send_" + msg.TYPE, after="_done")
        wrap(control.ControlChannel, "_dispatch", lambda self, msg: "got_" + msg.TYPE)
        wrap(client.Client, "join_session", "join_session", after="join_session_done")
        wrap(client, "serve_connect_request", "target_thread")
        try:  # warm sessions (copies of the library without them have none of these)
            from chuantou_client import target, warm, warmtarget
            wrap(warm.WarmPool, "serve", "warm_serve", after="warm_serve_done")
            wrap(warmtarget, "_refusal_now", "got_go")
            wrap(target, "_connect_service", "service_connect", after="service_connect_done")
        except ImportError:
            pass

    def dump() -> None:
        with open(os.path.join(path, f"{role}.trace"), "w") as f:
            for ts, name in list(events):
                f.write(f"{ts} {name}\n")

    return dump


# --- relay server --------------------------------------------------------------------------

def run_server(args) -> int:
    stop = _prepare_process()
    dump = _maybe_profile()
    trace = _maybe_trace("server")
    from chuantou_server import Server
    caps = {}
    if args.session_cap:
        n = args.session_cap
        caps = {"max_sessions": n, "max_sessions_per_client": n, "max_sessions_per_target": n}
    server = Server(host=HOST, port=0, **caps).start()
    try:
        _say(f"PORT {server.port}")
        _say("READY")
        _wait(stop)
    finally:
        server.stop()
        if dump:
            dump("server")
        if trace:
            trace()
    return 0


# --- client A or B -------------------------------------------------------------------------

def run_client(args) -> int:
    stop = _prepare_process()
    dump = _maybe_profile()
    trace = _maybe_trace(f"client{args.id}")
    from chuantou_client import Client
    import inspect
    path = {"path": args.path} if "path" in inspect.signature(Client).parameters else {}  # older copies: relay only
    client = Client(args.server, client_id=args.id, allow_unsealed=args.unsealed, **path)
    if args.unsealed:  # as an older chuantou: registers no key, so no session of it is sealed
        client.control.public_key = None
    client.start()
    # warm sessions per proxy (warm.py): as the CLI's default, or BENCH_WARM=N (older copies: none)
    warm = {}
    if "warm" in inspect.signature(client.create_proxy).parameters:
        from chuantou_client.warm import DEFAULT_WARM
        warm = {"warm": int(os.environ.get("BENCH_WARM", DEFAULT_WARM))}
    try:
        for spec in args.proxy or []:
            name, target, port, proto = spec.split(":")
            proxy = client.create_proxy(0, target, int(port), protocol=proto, **warm)
            _say(f"PROXY {name} {proxy.local_port}")
        _say("READY")
        _wait(stop)
    finally:
        client.stop()
        if dump:
            dump(f"client{args.id}")
        if trace:
            trace()
    return 0


# --- the service: echo (TCP and UDP on one port number), source, sink ----------------------

def _listen_tcp(port: int = 0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, port))
    s.listen(4096)
    return s


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("eof")
        data += chunk
    return data


def _echo(sock: socket.socket) -> None:
    # Small reads until the stream proves bulky, so 1,000 idle echo connections hold no 1 MiB each.
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return
            sock.sendall(data)
            if len(data) == 65536:
                break
        buf = bytearray(BUF)
        view = memoryview(buf)
        while True:
            n = sock.recv_into(buf)
            if not n:
                return
            sock.sendall(view[:n])
    except OSError:
        pass
    finally:
        sock.close()


_PATTERN = os.urandom(BUF)


def _source(sock: socket.socket) -> None:
    """Read an 8-byte big-endian length, send that many bytes, close."""
    try:
        (total,) = struct.unpack("!Q", _recv_exact(sock, 8))
        view = memoryview(_PATTERN)
        while total:
            n = min(total, BUF)
            sock.sendall(view[:n])
            total -= n
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # wait for the user's close, so no unread byte turns our close into a reset
    except OSError:
        pass
    finally:
        sock.close()


def _sink(sock: socket.socket) -> None:
    """Read until EOF, answer the 8-byte count, close."""
    try:
        buf = bytearray(BUF)
        total = 0
        recv_into = sock.recv_into
        while True:
            n = recv_into(buf)
            if not n:
                break
            total += n
        sock.sendall(struct.pack("!Q", total))
    except OSError:
        pass
    finally:
        sock.close()


def _accept_loop(listener: socket.socket, handler, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except OSError:
            if stop.is_set():
                return
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(sock,), daemon=True).start()


def _udp_echo(sock: socket.socket, stop: threading.Event) -> None:
    buf = bytearray(65536)
    view = memoryview(buf)
    sock.settimeout(0.25)
    recvfrom_into = sock.recvfrom_into
    sendto = sock.sendto
    while not stop.is_set():
        try:
            n, addr = recvfrom_into(buf)
        except socket.timeout:
            continue
        except OSError:
            if stop.is_set():
                return
            continue
        try:
            sendto(view[:n], addr)
        except OSError:
            pass


def run_service(args) -> int:
    stop = _prepare_process()
    echo = _listen_tcp()
    port = echo.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, port))
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        udp.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
    source = _listen_tcp()
    sink = _listen_tcp()
    threads = [
        threading.Thread(target=_accept_loop, args=(echo, _echo, stop), daemon=True),
        threading.Thread(target=_accept_loop, args=(source, _source, stop), daemon=True),
        threading.Thread(target=_accept_loop, args=(sink, _sink, stop), daemon=True),
        threading.Thread(target=_udp_echo, args=(udp, stop), daemon=True),
    ]
    for t in threads:
        t.start()
    _say(f"PORTS {port} {source.getsockname()[1]} {sink.getsockname()[1]}")
    _say("READY")
    try:
        _wait(stop)
    finally:
        stop.set()
        for s in (echo, source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        udp.close()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="role", required=True)
    srv = sub.add_parser("server")
    srv.add_argument("--session-cap", type=int, default=0,
                     help="raise the relay's session caps (total, per client, per target) to N (bench_scale.py)")
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--id", required=True)
    c.add_argument("--proxy", action="append", help="NAME:TARGET_ID:TARGET_PORT:PROTO")
    c.add_argument("--path", default="relay", choices=("relay", "auto", "direct"),
                   help="UDP path (default relay: on one host a direct path would bypass the relay being measured)")
    c.add_argument("--unsealed", action="store_true",
                   help="register no key and allow unsealed sessions: the tunnel as it was before sealing")
    sub.add_parser("service")
    args = parser.parse_args(argv)
    return {"server": run_server, "client": run_client, "service": run_service}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
