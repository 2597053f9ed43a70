# The 32-bit test runtime's `socket`: the loopback of usocket.py.
from usocket import socket, getaddrinfo  # noqa: F401
