"""chuantou client: ``Client(server_url, client_id).start()``, ``.create_proxy(...)``, ``.stop()``."""

from common.errors import ChuantouError, PortInUseError

from .client import DEFAULT_SERVER_URL, Client
from .proxy import Proxy

__all__ = ["Client", "Proxy", "ChuantouError", "PortInUseError", "DEFAULT_SERVER_URL"]
