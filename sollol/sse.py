"""Server-sent events: split an upstream byte stream into events.

Per the SSE specification an event ends at a blank line, and lines may end in
``\\r\\n``, ``\\r`` or ``\\n``. Network reads split events, lines and even UTF-8
sequences anywhere; the parser keeps the unfinished tail until the next read.
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    # The ``data`` field, with multiple data lines joined by "\n"; None for an
    # event that carried only comments or other fields.
    data: bytes | None
    # The event exactly as received, normalised to "\n" line ends and ending
    # in a blank line, for forwarding unchanged.
    raw: bytes


class SSEParser:
    def __init__(self) -> None:
        self._buffer = bytearray()
        self._held_cr = False

    def feed(self, chunk: bytes) -> list[Event]:
        """Add bytes from the network; return the events they completed, in order."""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        # A "\r" at the end of a read may be the first half of "\r\n".
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        self._buffer += chunk

        events = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                break
            raw = bytes(self._buffer[: end + 2])
            del self._buffer[: end + 2]
            events.append(_parse_event(raw))
        return events

    def finish(self) -> list[Event]:
        """Call at end of stream: a held "\r" was a line end after all."""
        if not self._held_cr:
            return []
        self._held_cr = False
        return self.feed(b"\n")

    @property
    def pending(self) -> bytes:
        """Bytes of an event that has started but not ended."""
        return bytes(self._buffer) + (b"\r" if self._held_cr else b"")


def _parse_event(raw: bytes) -> Event:
    data_lines = []
    for line in raw[:-2].split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data_lines.append(value[1:] if value.startswith(b" ") else value)
    return Event(data=b"\n".join(data_lines) if data_lines else None, raw=raw)


class LineParser:
    """Newline-delimited JSON (Ollama's streams): one event per non-empty line.

    Same interface as SSEParser, so one relay reads either framing. ``data``
    is the line without its end, ``raw`` the line ending in a single "\\n".
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        events = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return events
            line = bytes(self._buffer[:end]).rstrip(b"\r")
            del self._buffer[: end + 1]
            if line.strip():
                events.append(Event(data=line, raw=line + b"\n"))

    def finish(self) -> list[Event]:
        """Call at end of stream: a last line without its "\\n" still counts."""
        line = bytes(self._buffer).strip()
        self._buffer.clear()
        return [Event(data=line, raw=line + b"\n")] if line else []

    @property
    def pending(self) -> bytes:
        return bytes(self._buffer)
