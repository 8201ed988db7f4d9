"""Write SOLLOL's own tiny GGUF model: llama architecture, random weights, byte vocabulary.

No model can be downloaded where SOLLOL is tested, so the demo and the tests
generate this one (about 5 MB). llama-server loads it and produces real, if
meaningless, tokens. Random weights pick byte tokens freely, so replies often
contain multi-byte UTF-8 characters split across stream chunks, a useful test
of any proxy.
"""

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

# Token types of the llama (SentencePiece) vocabulary, per gguf.TokenType.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6

# A ChatML template, so /v1/chat/completions formats messages predictably.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "are",
    "or",
    "not",
    "node",
    "model",
    "token",
    "route",
    "fast",
    "slow",
    "cache",
    "queue",
    "load",
    "ok",
    "hello",
    "world",
    "llama",
    "cpp",
    "server",
    "router",
    "shard",
    "group",
    "request",
    "reply",
    "stream",
    "byte",
    "prompt",
    "answer",
    "time",
    "first",
    "last",
    "one",
    "two",
)


@dataclass(frozen=True, slots=True)
class TinyModelShape:
    vocab_size: int = 320
    embedding_length: int = 256
    head_count: int = 4
    head_count_kv: int = 2
    feed_forward_length: int = 512
    block_count: int = 2
    context_length: int = 2048


def build_vocabulary(vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Return tokens, scores and token types: 3 control tokens, 256 bytes, then words."""
    tokens = [b"<unk>", b"<s>", b"</s>"]
    types = [_UNKNOWN, _CONTROL, _CONTROL]
    tokens += [f"<0x{value:02X}>".encode() for value in range(256)]
    types += [_BYTE] * 256

    words = ["\u2581"] + ["\u2581" + word for word in _WORDS] + list(_WORDS)
    filler = 0
    while len(tokens) < vocab_size:
        if words:
            tokens.append(words.pop(0).encode())
        else:
            tokens.append(f"\u2581w{filler}".encode())
            filler += 1
        types.append(_NORMAL)
    if len(tokens) > vocab_size:
        raise ValueError(f"vocab_size must be at least {len(tokens)}, got {vocab_size}")
    scores = [0.0] * 259 + [-float(i) for i in range(vocab_size - 259)]
    return tokens, scores, types


def write_tiny_model(
    path: str | Path, *, shape: TinyModelShape = TinyModelShape(), seed: int = 0
) -> Path:
    """Write the model to ``path`` (F32 weights drawn from N(0, 0.02)) and return the path."""
    if shape.embedding_length % shape.head_count or shape.head_count % shape.head_count_kv:
        raise ValueError("embedding_length must divide by head_count, head_count by head_count_kv")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    e = shape.embedding_length
    head_dim = e // shape.head_count
    kv_dim = head_dim * shape.head_count_kv

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("sollol-tiny")
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(e)
    writer.add_block_count(shape.block_count)
    writer.add_feed_forward_length(shape.feed_forward_length)
    writer.add_head_count(shape.head_count)
    writer.add_head_count_kv(shape.head_count_kv)
    # llama.cpp rejects the file unless the rotary dimension equals E / H.
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, scores, types = build_vocabulary(shape.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    writer.add_tensor("token_embd.weight", matrix(shape.vocab_size, e))
    writer.add_tensor("output_norm.weight", np.ones(e, dtype=np.float32))
    writer.add_tensor("output.weight", matrix(shape.vocab_size, e))
    for block in range(shape.block_count):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(e, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", matrix(e, e))
        writer.add_tensor(f"{prefix}.attn_k.weight", matrix(kv_dim, e))
        writer.add_tensor(f"{prefix}.attn_v.weight", matrix(kv_dim, e))
        writer.add_tensor(f"{prefix}.attn_output.weight", matrix(e, e))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(e, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", matrix(shape.feed_forward_length, e))
        writer.add_tensor(f"{prefix}.ffn_up.weight", matrix(shape.feed_forward_length, e))
        writer.add_tensor(f"{prefix}.ffn_down.weight", matrix(e, shape.feed_forward_length))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
