"""Errors raised to users of the library; each message names the problem and the fix."""


class ChuantouError(Exception):
    """Base of every error chuantou raises on purpose."""


class PortInUseError(ChuantouError, OSError):
    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.port = port
        self.host = host
        super().__init__(f"port {port} is already in use; choose another with --local-port")


class NotConnectedError(ChuantouError):
    """The control channel to the relay is not up (yet or any more)."""


class RequestError(ChuantouError):
    """The relay (or the target client) answered a request with an error."""

    def __init__(self, message: str, code: str = "error"):
        self.code = code
        super().__init__(message)
