"""The target side (B): answer the relay's ``connect_request`` by connecting to the local
service and joining the session, or rejecting it with the reason."""

from __future__ import annotations

import logging
import socket

from common import protocol as p
from common.errors import ChuantouError
from common.net import reset_connection, tune_tcp
from common.pipe import Pipe

from .udp import UdpTarget

log = logging.getLogger("chuantou.client")

LOCAL_CONNECT_TIMEOUT = 5.0


def serve_connect_request(client, msg: p.ConnectRequest) -> None:
    if msg.sessionId is None or msg.secret is None or msg.relayAddr is None:
        log.warning("ignoring a connect_request without session fields")
        return
    service = (msg.remoteHost or client.target_host, msg.remotePort)
    refusal = client.export.refusal(*service)
    if refusal is not None:
        log.warning("session from %s to %s:%d refused: %s", msg.fromClientId, service[0], service[1], refusal)
        _send_quietly(client, p.RejectSession(sessionId=msg.sessionId, reason=refusal))
        return
    if msg.protocol == "udp":
        flow = UdpTarget(client, msg, service)
        client._track_session(msg.sessionId, flow)
        try:
            flow.run()
        finally:
            client._untrack_session(msg.sessionId)
        return
    try:
        local = socket.create_connection(service, timeout=LOCAL_CONNECT_TIMEOUT)
    except OSError as exc:
        reason = f"cannot connect to {service[0]}:{service[1]}: {exc.strerror or exc}"
        log.info("session from %s refused: %s", msg.fromClientId, reason)
        _send_quietly(client, p.RejectSession(sessionId=msg.sessionId, reason=reason))
        return
    tune_tcp(local)
    local.settimeout(None)
    try:
        relay = client.join_session(msg, "B")
    except ChuantouError as exc:
        log.warning("session from %s to port %d failed: %s", msg.fromClientId, msg.remotePort, exc)
        reset_connection(local)
        return
    _send_quietly(client, p.AcceptSession(sessionId=msg.sessionId))
    pipe = Pipe(relay, local)
    client._track_session(msg.sessionId, pipe)
    try:
        pipe.run(client.threads, f"b-{msg.sessionId[:8]}")
    finally:
        client._untrack_session(msg.sessionId)


def _send_quietly(client, msg) -> None:
    try:
        client.control.send(msg)
    except ChuantouError as exc:
        log.info("could not tell the relay %s: %s", msg.TYPE, exc)
