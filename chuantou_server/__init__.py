"""chuantou relay server: ``Server(host, port).start()`` ... ``.stop()``."""

from .server import Server

__all__ = ["Server"]
