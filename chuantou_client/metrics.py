"""The client's Prometheus metrics, served by its local API (``GET /metrics``, behind the API
secret like ``/api/``), and its health: registered with the relay or not (``GET /healthz``).

Everything is read from the running Client at each scrape (one registry per local API, so
clients in one process never share figures); labels take values from small fixed sets.
"""

from __future__ import annotations

import threading
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

PROXY_PROTOCOLS = ("tcp", "udp", "both")
SESSION_PROTOCOLS = ("tcp", "udp")
SIDES = ("A", "B")  # A: from a proxy here; B: to a service here


class ClientMetrics:
    def __init__(self, app):
        self.registry = CollectorRegistry()
        self.registry.register(ClientFigures(app))
        ProcessCollector(registry=self.registry)

    def exposition(self, accept: str) -> tuple[str, bytes]:
        """(content type, body) in the text format the scraper asked for."""
        encoder, content_type = choose_encoder(accept)
        return content_type, encoder(self.registry)


def healthy(app) -> bool:
    client = getattr(app, "client", None)
    return client is not None and client.connected


class ClientFigures(Collector):
    def __init__(self, app):
        self.app = app
        self._lock = threading.Lock()
        # A proxy's bytes move from its own figures to the session book's when it closes, and a
        # scrape in between may see them in both or neither: report the highest total seen, so
        # a counter never goes back (a reset to Prometheus).
        self._bytes_seen = [0, 0]

    def collect(self) -> Iterator:
        client = getattr(self.app, "client", None)
        if client is None:
            return
        yield GaugeMetricFamily("chuantou_client_connected", "1 while registered with the relay, else 0",
                                value=1 if client.connected else 0)
        yield CounterMetricFamily("chuantou_client_reconnects", "Reconnections to the relay since start",
                                  value=client.control.reconnects)
        yield self._proxies(client)
        yield self._sessions(client)
        yield self._bytes(client)

    def _proxies(self, client) -> GaugeMetricFamily:
        counts = dict.fromkeys(PROXY_PROTOCOLS, 0)
        for proxy in client.proxies:
            if proxy.protocol in counts:
                counts[proxy.protocol] += 1
        family = GaugeMetricFamily("chuantou_client_proxies", "Proxies listening here, by protocol",
                                   labels=["protocol"])
        for protocol, count in counts.items():
            family.add_metric([protocol], count)
        return family

    def _sessions(self, client) -> GaugeMetricFamily:
        counts = {(side, protocol): 0 for side in SIDES for protocol in SESSION_PROTOCOLS}
        for record in client.sessions.records():
            key = (record.side, record.protocol)
            if key in counts:
                counts[key] += 1
        family = GaugeMetricFamily("chuantou_client_sessions_open",
                                   "Sessions running through this client, by side (A: from a proxy here, "
                                   "B: to a service here) and protocol", labels=["side", "protocol"])
        for (side, protocol), count in counts.items():
            family.add_metric([side, protocol], count)
        return family

    def _bytes(self, client) -> CounterMetricFamily:
        received, sent = client.byte_totals()  # running sessions' live counts included
        with self._lock:
            seen = self._bytes_seen
            seen[0], seen[1] = max(seen[0], received), max(seen[1], sent)
            received, sent = seen
        family = CounterMetricFamily("chuantou_client_bytes", "Bytes through the relay, by direction",
                                     labels=["direction"])
        family.add_metric(["received"], received)
        family.add_metric(["sent"], sent)
        return family
