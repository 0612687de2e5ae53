"""Loopback ports for services started here (tests and benchmarks start brokers, servers and
workers side by side, each on ports of its own)."""

import contextlib
import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports free right now (all held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind(("127.0.0.1", 0))
            ports.append(int(probe.getsockname()[1]))
        return ports
