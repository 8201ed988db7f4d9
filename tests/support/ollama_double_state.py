"""Models, load state, parallel slots and the request queue of the Ollama double.

Ollama keeps a model in memory for ``keep_alive`` after its last request.
It serves up to OLLAMA_NUM_PARALLEL requests per loaded model at once and
queues up to OLLAMA_MAX_QUEUE more, so further requests get 503. When a new
model does not fit, it first unloads an idle one. ``ModelScheduler`` simulates
this inside the double's event loop, loading one model at a time, and does no
HTTP.
"""

import asyncio
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

DEFAULT_KEEP_ALIVE_S = 300.0  # OLLAMA_KEEP_ALIVE defaults to 5 minutes.
# Ollama stores a negative keep_alive as the largest Go duration (2**63 - 1 ns,
# about 292 years), so such a model never expires.
FOREVER_S = (2**63 - 1) / 1e9
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
# Which idle model makes room for another: the least recently used one, or the
# one Ollama's scheduler picks (server/sched.go, findRunnerToUnload): the
# shortest keep_alive first, then the first name in lexical order.
EVICTIONS = ("lru", "ollama")

_GO_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_GO_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass
class DoubleModel:
    """A model that the double lists and serves, with the seconds it takes to load."""

    name: str
    size_bytes: int = 2_000_000_000
    family: str = "llama"
    parameter_size: str = "3.2B"
    quantization_level: str = "Q4_K_M"
    load_s: float = 0.0
    context_length: int = 4096
    parallel: int | None = None  # slots when loaded, or None for the double's ``parallel``

    def __post_init__(self) -> None:
        if self.load_s < 0:
            raise ValueError(f"load_s of {self.name!r} must be >= 0, got {self.load_s}")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError(f"parallel of {self.name!r} must be >= 1 or None, got {self.parallel}")

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }


@dataclass(frozen=True)
class Faults:
    """Faults injected into inference requests on the native API and on ``/v1``.

    ``busy_503`` rejects each request with Ollama's queue-full 503 before
    anything is sent. The others strike after that many reply pieces, or
    before the final line when the reply is shorter: ``error_mid_stream``
    ends the reply with an error, ``reset_after`` resets the TCP connection
    and ``stall_after`` sends nothing more until the client disconnects.
    """

    busy_503: bool = False
    error_mid_stream: int | None = None
    reset_after: int | None = None
    stall_after: int | None = None

    def __post_init__(self) -> None:
        for name, after in self._piece_faults():
            if after < 0:
                raise ValueError(f"{name} must be a number of pieces >= 0, got {after}")

    def first_piece_fault(self) -> tuple[str, int] | None:
        """Return the name of the piece fault that strikes first and its piece count."""
        faults = sorted(self._piece_faults(), key=lambda fault: fault[1])
        return faults[0] if faults else None

    def _piece_faults(self) -> list[tuple[str, int]]:
        candidates = [
            ("error_mid_stream", self.error_mid_stream),
            ("reset_after", self.reset_after),
            ("stall_after", self.stall_after),
        ]
        return [(name, after) for name, after in candidates if after is not None]


class ServerBusyError(Exception):
    """Raised when the queue is full; Ollama replies 503 with ``BUSY_MESSAGE``."""


def parse_keep_alive(value: Any) -> float:
    """Return ``keep_alive`` in seconds: a number of seconds or a Go duration such as "5m".

    A negative value means "keep loaded forever", as in Ollama. Raises
    ValueError with Go's message for text that is not a duration.
    """
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"keep_alive must be a number or a duration string, got {value!r}")
    seconds = _parse_go_duration(value) if isinstance(value, str) else float(value)
    return FOREVER_S if seconds < 0 else seconds


def _parse_go_duration(text: str) -> float:
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
    if body == "0":
        return 0.0
    parts = _GO_DURATION.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * sum(float(number) * _GO_UNIT_S[unit] for number, unit in parts)


@dataclass(eq=False)
class LoadedModel:
    """A model in memory, with its slots and the requests that hold it."""

    model: DoubleModel
    slots: asyncio.Semaphore
    size_vram_bytes: int
    keep_alive_s: float
    users: int = 0
    idle_since: float = 0.0  # time.time() when ``users`` last fell to 0

    def expires_at(self, now: float) -> float:
        """Return the Unix time at which this model unloads if no request uses it."""
        if self.keep_alive_s >= FOREVER_S:
            return now + FOREVER_S
        start = now if self.users else self.idle_since
        return start + self.keep_alive_s


class ModelScheduler:
    """Load state and slots of the double's models, used only in the double's event loop.

    The counters may be read from other threads: ``in_flight`` counts
    requests holding a slot, ``queued`` counts requests waiting for a load or
    a slot, and ``max_seen_in_flight`` is the highest ``in_flight`` so far.
    """

    def __init__(
        self,
        *,
        parallel: int,
        max_queue: int,
        max_loaded_models: int | None,
        memory_bytes: int | None,
        eviction: str = "lru",
    ) -> None:
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_loaded_models is not None and max_loaded_models < 1:
            raise ValueError(f"max_loaded_models must be >= 1 or None, got {max_loaded_models}")
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {eviction!r}")
        self.parallel = parallel
        self.max_queue = max_queue
        self.max_loaded_models = max_loaded_models
        self.memory_bytes = memory_bytes
        self.eviction = eviction
        self.in_flight = 0
        self.queued = 0
        self.max_seen_in_flight = 0
        # Least recently used first, so "lru" eviction takes the first idle entry.
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._load_lock = asyncio.Lock()
        self._model_idle = asyncio.Event()

    def preload(self, model: DoubleModel) -> None:
        """Load ``model`` at once with no wait, as for the models loaded at start."""
        if not self._fits(model):
            raise ValueError(f"preloaded model {model.name!r} does not fit beside the others")
        self._add(model)

    def loaded(self) -> list[LoadedModel]:
        """Return the models in memory, least recently used first."""
        self._expire()
        return list(self._loaded.values())

    def expire_now(self, name: str) -> None:
        """Unload ``name`` now, or when its last request ends, as keep_alive 0 does."""
        entry = self._loaded.get(name)
        if entry is None:
            return
        entry.keep_alive_s = 0.0
        if entry.users == 0:
            self._unload(name)

    @asynccontextmanager
    async def use(
        self, model: DoubleModel, keep_alive_s: float, *, slot: bool = True
    ) -> AsyncIterator[int]:
        """Hold ``model`` loaded (and one of its slots if ``slot``) for one request.

        Yields the nanoseconds spent waiting for the queue and the load,
        which Ollama reports as ``load_duration``. Raises ServerBusyError
        when the request would have to wait and the queue is full.
        """
        started_ns = time.perf_counter_ns()
        entry = self._entry(model.name)
        starts_now = entry is not None and not (slot and entry.slots.locked())
        if not starts_now and self.queued >= self.max_queue:
            raise ServerBusyError(BUSY_MESSAGE)
        self.queued += 1
        try:
            entry = await self._hold(model, keep_alive_s)
            load_ns = time.perf_counter_ns() - started_ns
            try:
                if slot:
                    await entry.slots.acquire()
            except BaseException:
                self._let_go(entry)
                raise
        finally:
            self.queued -= 1
        try:
            if slot:
                self.in_flight += 1
                self.max_seen_in_flight = max(self.max_seen_in_flight, self.in_flight)
            yield load_ns
        finally:
            if slot:
                self.in_flight -= 1
                entry.slots.release()
            self._let_go(entry)

    async def _hold(self, model: DoubleModel, keep_alive_s: float) -> LoadedModel:
        entry = self._entry(model.name)
        if entry is None:
            async with self._load_lock:
                entry = self._entry(model.name)
                if entry is None:
                    entry = await self._load(model)
        entry.users += 1
        entry.keep_alive_s = keep_alive_s
        self._loaded.move_to_end(model.name)
        return entry

    def _let_go(self, entry: LoadedModel) -> None:
        entry.users -= 1
        if entry.users:
            return
        entry.idle_since = time.time()
        if entry.keep_alive_s == 0 and self._loaded.get(entry.model.name) is entry:
            self._unload(entry.model.name)
        self._model_idle.set()

    async def _load(self, model: DoubleModel) -> LoadedModel:
        while not self._fits(model):
            idle = self._eviction_candidate()
            if idle is not None:
                self._unload(idle.model.name)
                continue
            # Every loaded model is in use: wait until one of them is idle.
            self._model_idle.clear()
            await self._model_idle.wait()
        await asyncio.sleep(model.load_s)
        return self._add(model)

    def _eviction_candidate(self) -> LoadedModel | None:
        idle = [entry for entry in self._loaded.values() if entry.users == 0]
        if not idle or self.eviction == "lru":
            return idle[0] if idle else None
        return min(idle, key=lambda entry: (entry.keep_alive_s, entry.model.name))

    def _add(self, model: DoubleModel) -> LoadedModel:
        size_vram = model.size_bytes
        if self.memory_bytes is not None:
            # A model larger than the whole memory loads anyway, partly
            # outside it, which /api/ps shows as size_vram < size.
            size_vram = min(size_vram, max(0, self.memory_bytes - self._used_bytes()))
        entry = LoadedModel(
            model=model,
            slots=asyncio.Semaphore(model.parallel or self.parallel),
            size_vram_bytes=size_vram,
            keep_alive_s=DEFAULT_KEEP_ALIVE_S,
            idle_since=time.time(),
        )
        self._loaded[model.name] = entry
        return entry

    def _fits(self, model: DoubleModel) -> bool:
        if self.max_loaded_models is not None and len(self._loaded) >= self.max_loaded_models:
            return False
        if self.memory_bytes is None or not self._loaded:
            return True
        return self._used_bytes() + model.size_bytes <= self.memory_bytes

    def _used_bytes(self) -> int:
        return sum(entry.size_vram_bytes for entry in self._loaded.values())

    def _entry(self, name: str) -> LoadedModel | None:
        self._expire()
        return self._loaded.get(name)

    def _expire(self) -> None:
        now = time.time()
        for name, entry in list(self._loaded.items()):
            if entry.users == 0 and entry.expires_at(now) <= now:
                self._unload(name)

    def _unload(self, name: str) -> None:
        del self._loaded[name]
