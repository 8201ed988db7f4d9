"""A client for the start of llama.cpp's RPC protocol: HELLO, device count, device memory.

Wire format (ggml-rpc.cpp, protocol 7.0.0), all integers little-endian:
a request is ``cmd (1 byte) | size (u64) | payload``, a reply is
``size (u64) | payload``. HELLO (cmd 14) must be the first command of a
connection. Its request carries 24 bytes of transport capabilities (all zero
means plain TCP). Its reply is ``major, minor, patch, padding`` (1 byte each)
and 24 bytes of capabilities. DEVICE_COUNT (15) takes an empty payload and
returns a u32; GET_DEVICE_MEMORY (11) takes a u32 device index and returns
``free, total`` as two u64.

A worker serves one connection at a time, so the probe closes its connection
as soon as it has the figures, before the coordinator connects.
"""

import socket
import struct
from dataclasses import dataclass

from .errors import VersionMismatchError, WorkerUnreachableError

CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_BYTES = 24
_HELLO_REPLY = struct.Struct(f"<BBBx{CONN_CAPS_BYTES}s")
_SIZE = struct.Struct("<Q")
# A worker has one device per backend (CPU, each GPU); more means a garbled reply.
_MAX_DEVICES = 64


@dataclass(frozen=True, slots=True, order=True)
class RpcVersion:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    def accepted_by(self, client: "RpcVersion") -> bool:
        """Apply llama.cpp's own check: the same major, and a minor no newer than the client's."""
        return self.major == client.major and self.minor <= client.minor


@dataclass(frozen=True, slots=True)
class WorkerReport:
    """The figures a worker returned on one probe connection."""

    version: RpcVersion
    # Summed over the worker's devices; None when its version is not accepted,
    # since the commands after HELLO may differ in another protocol version.
    free_bytes: int | None
    total_bytes: int | None


def probe_worker(
    host: str, port: int, *, client_version: RpcVersion, timeout_s: float = 5.0
) -> WorkerReport:
    """Connect, send HELLO, read each device's memory, and close the connection.

    The memory is read only when ``client_version`` accepts the worker's version.

    Raise WorkerUnreachableError when the worker cannot be reached or replies
    with something that is not the RPC protocol.
    """
    address = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            try:
                version = _hello(sock)
            except _ProtocolError as exc:
                # Workers of older protocols expect another HELLO size (or no
                # HELLO at all) and close the connection on this one.
                raise VersionMismatchError(
                    f"RPC worker {address} rejected the HELLO of RPC protocol "
                    f"{client_version.major}.x ({exc}), so it runs another llama.cpp "
                    "version; run the same llama.cpp build on every machine"
                ) from exc
            if not version.accepted_by(client_version):
                return WorkerReport(version=version, free_bytes=None, total_bytes=None)
            free_bytes, total_bytes = _device_memory(sock)
    except OSError as exc:
        raise WorkerUnreachableError(
            f"RPC worker {address} cannot be reached: {exc.strerror or exc}"
        ) from exc
    except _ProtocolError as exc:
        raise WorkerUnreachableError(
            f"RPC worker {address} did not reply as an RPC server: {exc}"
        ) from exc
    return WorkerReport(version=version, free_bytes=free_bytes, total_bytes=total_bytes)


class _ProtocolError(Exception):
    pass


def _hello(sock: socket.socket) -> RpcVersion:
    try:
        payload = _call(sock, CMD_HELLO, bytes(CONN_CAPS_BYTES), _HELLO_REPLY.size)
    except ConnectionResetError as exc:
        # A worker that closes with part of the request unread resets the connection.
        raise _ProtocolError("connection reset") from exc
    major, minor, patch, _caps = _HELLO_REPLY.unpack(payload)
    return RpcVersion(major, minor, patch)


def _device_memory(sock: socket.socket) -> tuple[int, int]:
    (count,) = struct.unpack("<I", _call(sock, CMD_DEVICE_COUNT, b"", 4))
    if not 0 < count <= _MAX_DEVICES:
        raise _ProtocolError(f"device count {count} is out of range")
    free_bytes = total_bytes = 0
    for device in range(count):
        reply = _call(sock, CMD_GET_DEVICE_MEMORY, struct.pack("<I", device), 16)
        free, total = struct.unpack("<QQ", reply)
        free_bytes += free
        total_bytes += total
    return free_bytes, total_bytes


def _call(sock: socket.socket, command: int, payload: bytes, reply_bytes: int) -> bytes:
    sock.sendall(bytes([command]) + _SIZE.pack(len(payload)) + payload)
    (size,) = _SIZE.unpack(_receive(sock, _SIZE.size))
    if size != reply_bytes:
        raise _ProtocolError(f"command {command}: expected a {reply_bytes}-byte reply, got {size}")
    return _receive(sock, reply_bytes)


def _receive(sock: socket.socket, count: int) -> bytes:
    chunks = []
    remaining = count
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise _ProtocolError("connection closed before the reply was complete")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
