"""A stand-in for ggml-rpc-server on 127.0.0.1 that replies to HELLO with any version.

It serves HELLO, DEVICE_COUNT and GET_DEVICE_MEMORY (the commands SOLLOL's
probe sends) one connection at a time, as the real worker does, and closes a
connection on any other command.
"""

import contextlib
import socket
import struct
import threading

from sollol.shard.rpc import (
    CMD_DEVICE_COUNT,
    CMD_GET_DEVICE_MEMORY,
    CMD_HELLO,
    CONN_CAPS_BYTES,
)


class FakeRpcWorker:
    def __init__(
        self, version: tuple[int, int, int], *, free_bytes: int = 2**30, total_bytes: int = 2**31
    ) -> None:
        self.version = version
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FakeRpcWorker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._listener.close()
        if self._thread.is_alive():
            self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            self.connections += 1
            with connection, contextlib.suppress(OSError, ConnectionError):
                self._serve_connection(connection)

    def _serve_connection(self, connection: socket.socket) -> None:
        while True:
            head = _receive(connection, 9)
            if head is None:
                return
            command = head[0]
            (size,) = struct.unpack("<Q", head[1:])
            payload = _receive(connection, size) if size else b""
            if command == CMD_HELLO and size == CONN_CAPS_BYTES:
                reply = bytes([*self.version, 0]) + bytes(CONN_CAPS_BYTES)
            elif command == CMD_DEVICE_COUNT:
                reply = struct.pack("<I", 1)
            elif command == CMD_GET_DEVICE_MEMORY and payload == struct.pack("<I", 0):
                reply = struct.pack("<QQ", self.free_bytes, self.total_bytes)
            else:
                return
            connection.sendall(struct.pack("<Q", len(reply)) + reply)


def _receive(connection: socket.socket, count: int) -> bytes | None:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return data
