"""The client's relay URLs (a cluster's nodes): the order it tries them in and which
redirects it follows. No sockets; control.py asks.

Order (``--server-order``): ``in-order`` tries the list as given; ``random`` shuffles it once
per start and then goes round it the same way, so many clients with one list spread over the
nodes instead of all starting on the first.

Redirects (``register_redirect`` from a loaded node): followed only to a URL of the same scheme
(the TLS settings are one for the whole list) whose host is the host of a URL in the list, at
most ``MAX_REDIRECTS`` in a row and never back to a URL already visited. So a node, even a
hostile one, cannot aim this client at a host the user did not name. A redirect carries
nothing: the client registers at the new URL with the same ID, the token the user gave for this
cluster and a proof over the new node's own challenge; its proxies stay where they are.
"""

from __future__ import annotations

import random
from urllib.parse import urlsplit

IN_ORDER = "in-order"
RANDOM = "random"
ORDERS = (IN_ORDER, RANDOM)
MAX_REDIRECTS = 3  # redirects followed in a row before the client registers where its list says


def ordered(urls: list[str], order: str, rng: random.Random | None = None) -> list[str]:
    """The list to go round: as given, or shuffled (once) for ``random``."""
    if order not in ORDERS:
        raise ValueError(f"server order {order!r} must be one of {', '.join(ORDERS)}")
    urls = list(urls)
    if order == RANDOM:
        (rng or random.Random()).shuffle(urls)
    return urls


def redirect_problem(listed: list[str], visited: list[str], target: str) -> str | None:
    """Why the client does not follow a redirect to ``target`` after visiting ``visited`` (the
    first is the URL of its list it started at); None: it follows."""
    here = urlsplit(visited[-1])
    there = urlsplit(target)
    if there.scheme != here.scheme:
        return f"it changes the scheme from {here.scheme}:// to {there.scheme}://"
    if (there.hostname or "") not in {urlsplit(url).hostname for url in listed}:
        return ("its host is not the host of any --server URL (add the node's URL to --server to accept "
                "redirects to it)")
    if target in visited:
        return "it leads back to a relay already tried (a redirect loop)"
    if len(visited) > MAX_REDIRECTS:
        return f"it is redirect number {len(visited)} in a row (at most {MAX_REDIRECTS} are followed)"
    return None


class RelayList:
    """The list a client goes round, and where it is in it."""

    def __init__(self, urls: list[str], order: str = IN_ORDER, rng: random.Random | None = None):
        self.urls = ordered(urls, order, rng)
        self.order = order
        self._index = 0
        self._round = 0  # URLs moved through since the last registration (a full round: back off)

    @property
    def current(self) -> str:
        return self.urls[self._index]

    def advance(self) -> bool:
        """Move to the next URL; False when that starts a new round (or there is only one), so
        the caller waits its backoff before trying again."""
        if len(self.urls) == 1:
            return False
        self._round += 1
        self._index = (self._index + 1) % len(self.urls)
        if self._round >= len(self.urls):
            self._round = 0
            return False
        return True

    def registered_at(self, url: str) -> None:
        """A registration succeeded (at a URL of the list, or one a redirect led to): a new round
        starts, from there if it is in the list."""
        self._round = 0
        if url in self.urls:
            self._index = self.urls.index(url)
