"""Identity rules across a cluster (part of ``Cluster``, cluster.py): one client ID online once
in the whole cluster, bound to one credential, and taken over by the same credential as on one
relay (registry.py).

A register on node N2 for an ID that node N1 holds in Redis:

- another credential: refused ``id_taken``, also while the ID is only reserved for that credential
  (its client went offline less than ``idReservationTime`` ago: a reservation record in Redis);
- the same credential without takeover: ``id_in_use``;
- the same credential with takeover (the default of a client's register): N2's claim script
  (cluster_store._CLAIM) moves the ID's key to N2 and, in the same atomic step, publishes
  ``drop`` {clientId, node, credential} to N1, which tells its connection for the ID why
  (``replaced``, as one relay does) and closes it.

The credential is compared inside Redis from the fingerprint the claiming node computed when it
checked the client's proof, so a takeover needs the token; N1 also drops only a connection of
the same credential and only while the key is no longer its own (a newer claim on N1 wins).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from common import protocol as p

from . import registry as reg
from .cluster_store import IN_USE, RESERVED, TAKEN, TOOK, ClusterStore, StoreUnreachable

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("chuantou.server")


class IdentitySide:
    # set by Cluster.__init__
    server: Server
    node_id: str
    store: ClusterStore

    def _mark(self, reachable: bool, why: str = "") -> None:
        raise NotImplementedError

    def claim(self, client_id: str, credential: str | None,
              takeover: bool = True) -> tuple[tuple[str, str] | None, str | None]:
        """Hold the ID in the cluster. Returns (None, None) when granted, (None, node) when granted
        by taking it over from that node, or ((message, code), None) for the refusal."""
        registry = self.server.registry
        here = registry.refusal(client_id, credential, takeover)
        if here is not None:  # refused here anyway: never drop its connection on another node for it
            return registry.describe(client_id, here), None
        try:
            held = self.store.claim(client_id, credential, takeover)
        except StoreUnreachable as exc:
            # Local registration must keep working without the store; the refresher claims it later.
            self._mark(False, str(exc))
            return None, None
        self._mark(True)
        if held is None:
            return None, None
        why, holder = held
        node = holder.get("node")
        if why == TOOK:
            log.info("client %s taken over from relay node %s (same credential)", client_id, node)
            return None, str(node)
        if why == RESERVED:  # offline on another node, within its reservation for another token
            return registry.describe(client_id, reg.RESERVED), None
        if why == TAKEN:
            return (f"client ID '{client_id}' is online on relay node {node} with a different credential; "
                    f"choose another --client-id", p.ID_TAKEN), None
        assert why == IN_USE
        return (f"client ID '{client_id}' is in use by a live connection on relay node {node}, and this "
                f"registration asked not to replace it; if both run on purpose, give one another --client-id",
                p.ID_IN_USE), None

    def release(self, client_id: str, credential: str | None = None) -> None:
        """Our client went offline: with a credential its ID stays reserved for it cluster-wide
        (``idReservationTime``, at most ``maxReservedIdsPerToken`` per token, as on one relay);
        without one (a claim given back) its record goes."""
        registry = self.server.registry
        try:
            dropped = self.store.release(client_id, credential, registry.reservation_time if credential else 0.0,
                                         registry.max_reserved_per_credential)
        except StoreUnreachable:
            return  # the key expires within the TTL, with no reservation
        if dropped:
            registry.limit_log.bit("reserved_ids", credential or "",
                                   "credential %s holds more than %d offline client IDs in the cluster; the "
                                   "reservation of the oldest, %s, was dropped (raise maxReservedIdsPerToken to "
                                   "keep more)", credential, registry.max_reserved_per_credential, ", ".join(dropped))

    def client_ids(self) -> list[str]:
        try:
            return self.store.client_ids()
        except StoreUnreachable:
            return []

    def _on_drop(self, message: dict) -> None:
        """Another node took over one of our clients' IDs with the same credential: drop ours."""
        client_id, node = message["clientId"], message["node"]
        conn = self.server.registry.get(client_id)
        if conn is None or conn.credential != message["credential"]:
            return  # gone already, or not that credential's (never dropped for another token)
        try:
            holder = self.store.lookup(client_id)
        except StoreUnreachable:
            return  # the refresher sees the ID held twice and says so
        if holder is not None and holder.get("node") == self.node_id:
            return  # claimed here again since: the newer claim wins
        conn.send(p.Error(message=f"client ID '{client_id}' was registered by a new connection on relay node "
                                  f"{node}; this connection is closed", code="replaced"))
        conn.close()  # as on one relay: its running sessions go on; those still waiting for it end
        log.info("client %s was taken over on relay node %s; its connection here is closed", client_id, node)
