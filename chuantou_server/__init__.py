"""chuantou relay server: ``Server(host, port).start()`` ... ``.stop()``, or
``Server(config=ServerConfig(...))``."""

from .server import Server
from .settings import ServerConfig

__all__ = ["Server", "ServerConfig"]
