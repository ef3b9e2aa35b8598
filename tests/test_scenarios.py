"""The integration scenarios of the design, section 11 (11.1, 11.2, 11.3, 11.9, 11.10), over real
sockets on 127.0.0.1: one relay, clients A and B, services standing in for B's (and A's) programs."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket

from chuantou_client import ChuantouError, PortInUseError

from helpers import (
    HttpService,
    TcpService,
    connect,
    greeting_handler,
    http_get,
    http_request,
    json_route,
    recv_exactly,
    text_route,
    udp_roundtrip,
    wait_until,
    ws_connect,
    ws_greet_then_echo,
)


def run_concurrently(*calls, timeout: float = 30.0) -> list:
    """Run the zero-argument callables at the same time; return their results in order (re-raising errors)."""
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="svc-user") as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result(timeout=timeout) for f in futures]


# --- 11.1 ---------------------------------------------------------------------------------------

def test_11_1_both_clients_are_gateway_and_target_at_once(server, client_a, client_b, services):
    service_on_a = services(TcpService(greeting_handler(b"Hello from clientA:3000"), "svc-a"))
    service_on_b = services(TcpService(greeting_handler(b"Hello from clientB:3000"), "svc-b"))
    proxy1 = client_a.create_proxy(0, "B", service_on_b.port)  # user 1 -> A -> B:3000
    proxy2 = client_b.create_proxy(0, "A", service_on_a.port)  # user 2 -> B -> A:3000

    user1, user2 = run_concurrently(lambda: connect(proxy1.local_port), lambda: connect(proxy2.local_port))
    with user1, user2:
        greetings = run_concurrently(lambda: recv_exactly(user1, 23), lambda: recv_exactly(user2, 23))
        assert greetings == [b"Hello from clientB:3000", b"Hello from clientA:3000"]

        # two sessions, one each way, with distinct ids
        sessions = wait_until(lambda: len(server.sessions) == 2 and server.sessions.all())
        assert {(s.client_a, s.client_b) for s in sessions} == {("A", "B"), ("B", "A")}
        assert len({s.id for s in sessions}) == 2

        # data flows independently both ways on both connections
        user1.sendall(b"one")
        user2.sendall(b"two")
        assert recv_exactly(user1, 3) == b"one"
        assert recv_exactly(user2, 3) == b"two"

        # closing one leaves the other working
        user1.close()
        wait_until(lambda: len(server.sessions) == 1)
        assert [(s.client_a, s.client_b) for s in server.sessions.all()] == [("B", "A")]
        user2.sendall(b"still here")
        assert recv_exactly(user2, 10) == b"still here"

    proxy1.close()
    proxy2.close()
    wait_until(lambda: len(server.sessions) == 0)


# --- 11.2 ---------------------------------------------------------------------------------------

def test_11_2_websocket_http_tcp_and_udp_concurrently_through_four_proxies(
        server, client_a, client_b, ws_echo_service, http_service, tcp_echo, udp_echo, ws_clients):
    proxies = run_concurrently(
        lambda: client_a.create_proxy(0, "B", ws_echo_service.port, protocol="tcp"),
        lambda: client_a.create_proxy(0, "B", http_service.port, protocol="tcp"),
        lambda: client_a.create_proxy(0, "B", tcp_echo.port, protocol="tcp"),
        lambda: client_a.create_proxy(0, "B", udp_echo.port, protocol="udp"),
    )
    ws_proxy, http_proxy, tcp_proxy, udp_proxy = proxies
    assert len({p.local_port for p in proxies}) == 4

    def use_ws():
        ws = ws_clients(ws_connect(ws_proxy.local_port, "/"))
        answers = []
        for i in range(20):
            ws.send(f"ws message {i}")
            answers.append(ws.recv())
        ws.send_binary(bytes(range(256)) * 300)
        answers.append(ws.recv())
        return answers

    def use_http():
        return [http_get(http_proxy.local_port, "/") for _ in range(10)]

    def use_tcp():
        with connect(tcp_proxy.local_port) as sock:
            received = []
            for i in range(20):
                line = f"tcp line {i}\n".encode()
                sock.sendall(line)
                received.append(recv_exactly(sock, len(line)))
            return received

    def use_udp():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            return [udp_roundtrip(sock, udp_proxy.local_port, f"udp datagram {i}".encode()) for i in range(20)]

    ws_answers, http_answers, tcp_answers, udp_answers = run_concurrently(use_ws, use_http, use_tcp, use_udp)

    assert ws_answers == [f"ws message {i}" for i in range(20)] + [bytes(range(256)) * 300]
    assert http_answers == [(200, b"This is clientB service")] * 10
    assert tcp_answers == [f"tcp line {i}\n".encode() for i in range(20)]
    assert udp_answers == [f"udp datagram {i}".encode() for i in range(20)]
    for proxy in proxies:
        proxy.close()


# --- 11.3 ---------------------------------------------------------------------------------------

def test_11_3_http_and_websocket_on_one_service_port_through_one_proxy(client_a, client_b, services, ws_clients):
    mixed = services(HttpService(
        {("GET", "/api"): text_route("HTTP Response")},
        ws_session=ws_greet_then_echo("WebSocket Connected"),
        ws_path="/ws",
        name="mixed",
    ))
    proxy = client_a.create_proxy(0, "B", mixed.port)

    # both at the same time, on the same local port
    (status, body), ws = run_concurrently(
        lambda: http_get(proxy.local_port, "/api"),
        lambda: ws_clients(ws_connect(proxy.local_port, "/ws")),
    )
    assert (status, body) == (200, b"HTTP Response")
    assert ws.recv() == "WebSocket Connected"

    # the WebSocket stays up while more HTTP requests come and go beside it
    for i in range(5):
        assert http_get(proxy.local_port, "/api") == (200, b"HTTP Response")
        ws.send(f"ping {i}")
        assert ws.recv() == f"ping {i}"
    assert http_get(proxy.local_port, "/missing")[0] == 404
    ws.close()
    proxy.close()


def test_11_3_websocket_upgrade_on_an_http_only_path_is_answered_by_the_service(client_a, client_b, services):
    """The relay is transparent: what the service says about a bad upgrade reaches the user unchanged."""
    mixed = services(HttpService({("GET", "/api"): text_route("HTTP Response")},
                                 ws_session=ws_greet_then_echo("hi"), ws_path="/ws", name="mixed"))
    proxy = client_a.create_proxy(0, "B", mixed.port)
    with pytest.raises(websocket.WebSocketBadStatusException) as caught:
        ws_connect(proxy.local_port, "/api")
    assert caught.value.status_code == 400
    proxy.close()


# --- 11.9 ---------------------------------------------------------------------------------------

def test_11_9_port_conflict_then_another_port_works(client_a, client_b, services):
    local_service = services(HttpService({("GET", "/"): text_route("This is clientA local service")},
                                         name="a-local"))
    remote_service = services(HttpService({("GET", "/"): text_route("This is clientB service")}, name="b-http"))
    taken = local_service.port

    with pytest.raises(PortInUseError) as caught:
        client_a.create_proxy(taken, "B", remote_service.port)
    assert str(caught.value) == f"port {taken} is already in use; choose another with --local-port"
    assert isinstance(caught.value, ChuantouError)
    assert client_a.proxies == []

    proxy = client_a.create_proxy(0, "B", remote_service.port)
    assert proxy.local_port != taken
    local_reply, proxied_reply = run_concurrently(lambda: http_get(taken, "/"),
                                                  lambda: http_get(proxy.local_port, "/"))
    assert local_reply == (200, b"This is clientA local service")
    assert proxied_reply == (200, b"This is clientB service")
    proxy.close()


@pytest.mark.parametrize("protocol", ["udp", "both"])
def test_11_9_port_conflict_on_udp(client_a, client_b, udp_echo, protocol):
    """A local UDP socket on the port is a conflict too, for a proxy that needs UDP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        taken = holder.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"^port {taken} is already in use; choose another with --local-port$"):
            client_a.create_proxy(taken, "B", udp_echo.port, protocol=protocol)
        proxy = client_a.create_proxy(0, "B", udp_echo.port, protocol=protocol)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as user:
            assert udp_roundtrip(user, proxy.local_port, b"via another port") == b"via another port"
        proxy.close()


def test_11_9_tcp_proxy_over_a_busy_port_number_fails_whatever_the_protocol_choice(client_a, client_b, tcp_echo):
    with pytest.raises(PortInUseError, match=f"port {tcp_echo.port} is already in use"):
        client_a.create_proxy(tcp_echo.port, "B", tcp_echo.port, protocol="tcp")


# --- 11.10 --------------------------------------------------------------------------------------

def test_11_10_three_proxies_to_three_services_at_once(client_a, client_b, services):
    orders: dict[int, dict] = {}
    orders_lock = threading.Lock()

    def create_order(request: dict) -> dict:
        with orders_lock:
            order = {"id": len(orders) + 1, **request}
            orders[order["id"]] = order
            return order

    users = services(HttpService(
        {("GET", "/users/1"): json_route(lambda _: {"id": 1, "name": "ada"})}, name="users"))
    order_service = services(HttpService({("POST", "/orders"): json_route(create_order)}, name="orders"))
    payments = services(HttpService(
        {("POST", "/pay"): json_route(lambda req: {"orderId": req["orderId"],
                                                   "paid": req["orderId"] in orders})}, name="payments"))

    proxies = run_concurrently(*[
        (lambda port=svc.port: client_a.create_proxy(0, "B", port)) for svc in (users, order_service, payments)
    ])
    users_port, orders_port, pay_port = (p.local_port for p in proxies)

    def business_flow(_):
        status, body = http_request(users_port, "GET", "/users/1")
        user = json.loads(body)
        status2, body2 = http_request(orders_port, "POST", "/orders", {"userId": user["id"]})
        order = json.loads(body2)
        status3, body3 = http_request(pay_port, "POST", "/pay", {"orderId": order["id"]})
        return (status, status2, status3), user, order, json.loads(body3)

    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="svc-user") as pool:
        results = list(pool.map(business_flow, range(6), timeout=30))

    for statuses, user, order, payment in results:
        assert statuses == (200, 200, 200)
        assert order["userId"] == user["id"] == 1
        assert payment == {"orderId": order["id"], "paid": True}
    assert sorted(order["id"] for _, _, order, _ in results) == list(range(1, 7))
    for proxy in proxies:
        proxy.close()
