"""Memory-aware placement: which worker holds which layers of the model, and whether it fits.

The coordinator runs with ``-ngl 99``, so every repeating layer and the
output layer go to the RPC workers, and only the input embedding stays on
the coordinator's CPU. llama.cpp (llama-model.cpp, ``load_tensors``) gives
layer ``il`` of ``n + 1`` (the output layer last) to the first device whose
cumulative share of the tensor split exceeds ``il / (n + 1)``; ``assign_layers``
repeats that rule, in float32 as llama.cpp computes it, so the check here
matches what the coordinator will do.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PlacementError

_BLOCK = re.compile(r"blk\.(\d+)\.")
# llama.cpp's default KV cache type is F16, for keys and for values.
KV_BYTES_PER_VALUE = 2


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """Byte sizes of a GGUF model's parts, as placement needs them."""

    layer_bytes: tuple[int, ...]  # weights of each repeating layer (blk.N.*)
    output_bytes: int  # output norm and output matrix, on the last worker
    input_bytes: int  # token embedding, kept on the coordinator
    kv_bytes_per_token: int  # K and V cache of one layer for one token

    @property
    def layer_count(self) -> int:
        return len(self.layer_bytes)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.input_bytes


@dataclass(frozen=True, slots=True)
class WorkerShare:
    address: str
    memory_bytes: int
    layers: int  # repeating layers on this worker
    has_output: bool
    needed_bytes: int  # weights plus KV cache of its layers


@dataclass(frozen=True, slots=True)
class Placement:
    tensor_split: tuple[float, ...]  # one proportion per worker, in --rpc order
    shares: tuple[WorkerShare, ...]

    def split_argument(self) -> str:
        """Return the value of llama-server's ``--tensor-split``."""
        return ",".join(f"{value:.4g}" for value in self.tensor_split)


def read_model_layout(path: Path) -> ModelLayout:
    """Read tensor sizes and attention shape from a GGUF file's header (no weights are loaded)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise PlacementError(f"cannot read GGUF model {path}: {exc}") from exc
    architecture = _field(reader, "general.architecture")
    block_count = int(_field(reader, f"{architecture}.block_count"))
    embedding = int(_field(reader, f"{architecture}.embedding_length"))
    heads = int(_field(reader, f"{architecture}.attention.head_count"))
    kv_heads = int(_field(reader, f"{architecture}.attention.head_count_kv", heads))
    key_length = int(_field(reader, f"{architecture}.attention.key_length", embedding // heads))
    value_length = int(_field(reader, f"{architecture}.attention.value_length", key_length))

    layer_bytes = [0] * block_count
    output_bytes = input_bytes = 0
    tied_output = True
    token_embd_bytes = 0
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
        block = _BLOCK.match(tensor.name)
        if block and int(block.group(1)) < block_count:
            layer_bytes[int(block.group(1))] += size
        elif tensor.name.startswith("output"):
            output_bytes += size
            tied_output = tied_output and tensor.name != "output.weight"
        else:
            input_bytes += size
            if tensor.name == "token_embd.weight":
                token_embd_bytes = size
    if tied_output:
        # Without output.weight llama.cpp reuses the token embedding as the
        # output matrix and places a copy with the output layer.
        output_bytes += token_embd_bytes
    kv_bytes_per_token = (key_length + value_length) * kv_heads * KV_BYTES_PER_VALUE
    return ModelLayout(
        layer_bytes=tuple(layer_bytes),
        output_bytes=output_bytes,
        input_bytes=input_bytes,
        kv_bytes_per_token=kv_bytes_per_token,
    )


def _field(reader, key: str, default: object = None) -> object:  # type: ignore[no-untyped-def]
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise PlacementError(f"GGUF metadata has no {key}; cannot place the model")
        return default
    return field.contents()


def assign_layers(layer_count: int, tensor_split: Sequence[float]) -> list[int]:
    """Return the worker index of each layer, the output layer last (``layer_count + 1`` items)."""
    shares = np.asarray(tensor_split, dtype=np.float32)
    cumulative = np.cumsum(shares, dtype=np.float32) / np.float32(shares.sum())
    slots = layer_count + 1
    owners = []
    for layer in range(slots):
        position = np.float32(layer) / np.float32(slots)
        owner = int(np.searchsorted(cumulative, position, side="right"))
        owners.append(min(owner, len(shares) - 1))
    return owners


def layer_split(layer_count: int, memory_bytes: Sequence[int]) -> tuple[float, ...]:
    """Return a tensor split that gives each worker a layer count in proportion to its memory.

    Counts are rounded by largest remainder and the output layer goes to the
    last worker. Given split values equal to these counts (the output layer
    included), llama.cpp's rule in ``assign_layers`` reproduces them exactly:
    layer ``il`` goes to the first worker whose cumulative count exceeds ``il``.
    A split proportional to memory itself would not, because llama.cpp places
    layers by boundaries of the cumulative share and can leave a worker empty.
    """
    total = sum(memory_bytes)
    ideal = [layer_count * memory / total for memory in memory_bytes]
    counts = [int(value) for value in ideal]
    by_remainder = sorted(
        range(len(ideal)), key=lambda worker: (counts[worker] - ideal[worker], worker)
    )
    for worker in by_remainder[: layer_count - sum(counts)]:
        counts[worker] += 1
    counts[-1] += 1  # the output layer
    return tuple(float(count) for count in counts)


def plan_placement(
    layout: ModelLayout,
    *,
    addresses: Sequence[str],
    memory_bytes: Sequence[int],
    context_size: int,
    tensor_split: Sequence[float] | None = None,
) -> Placement:
    """Split the layers over the workers in proportion to their memory, or by ``tensor_split``.

    Raise PlacementError, with the figures, when a worker's share of the
    weights and KV cache is larger than its memory.
    """
    if len(addresses) != len(memory_bytes):
        raise ValueError("addresses and memory_bytes must have the same length")
    if tensor_split is None:
        split = layer_split(layout.layer_count, memory_bytes)
    else:
        if len(tensor_split) != len(addresses):
            raise PlacementError(
                f"tensor_split has {len(tensor_split)} values for {len(addresses)} workers"
            )
        split = tuple(float(value) for value in tensor_split)

    owners = assign_layers(layout.layer_count, split)
    kv_layer_bytes = layout.kv_bytes_per_token * context_size
    shares = []
    for worker, (address, memory) in enumerate(zip(addresses, memory_bytes, strict=True)):
        layers = [layer for layer in range(layout.layer_count) if owners[layer] == worker]
        has_output = owners[-1] == worker
        needed = sum(layout.layer_bytes[layer] + kv_layer_bytes for layer in layers)
        if has_output:
            needed += layout.output_bytes
        shares.append(
            WorkerShare(
                address=address,
                memory_bytes=memory,
                layers=len(layers),
                has_output=has_output,
                needed_bytes=needed,
            )
        )

    # NOTE: llama.cpp also allocates compute buffers on each device; their size
    # depends on the batch size and is not counted here.
    short = [share for share in shares if share.needed_bytes > share.memory_bytes]
    if short:
        total_needed = sum(share.needed_bytes for share in shares)
        total_memory = sum(memory_bytes)
        details = "; ".join(
            f"worker {share.address} needs {_size(share.needed_bytes)} for {share.layers} "
            f"layers{' and the output layer' if share.has_output else ''} "
            f"but has {_size(share.memory_bytes)}"
            for share in short
        )
        raise PlacementError(
            f"the group cannot hold the model: weights and KV cache for {context_size} tokens "
            f"need {_size(total_needed)} on the workers, which have {_size(total_memory)} in "
            f"all; {details}. Add workers, give them more memory, lower context_size, "
            "or change tensor_split"
        )
    return Placement(tensor_split=split, shares=tuple(shares))


def _size(value: int) -> str:
    return f"{value / 2**20:.1f} MiB" if value >= 2**20 else f"{value} bytes"
