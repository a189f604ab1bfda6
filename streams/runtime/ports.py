"""Local TCP ports: one that is free now, and whether one is taken."""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port(exclude: tuple[int, ...] = ()) -> int:
    """A port nothing listens on right now (the kernel's choice for 127.0.0.1:0)."""
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port


def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether binding ``port`` fails now. SO_REUSEADDR as Kafka's acceptor and aiohttp set
    it: a TIME_WAIT leftover does not count as taken."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False
