import gguf
import numpy as np

from sollol.tinymodel import TinyModelShape, build_vocabulary, write_tiny_model


def test_vocabulary_layout():
    tokens, scores, types = build_vocabulary(320)
    assert len(tokens) == len(scores) == len(types) == 320
    assert len(set(tokens)) == 320
    assert tokens[:3] == [b"<unk>", b"<s>", b"</s>"]
    assert tokens[3] == b"<0x00>"
    assert tokens[258] == b"<0xFF>"
    assert types[3:259] == [6] * 256


def test_written_file_metadata_and_tensors(tmp_path):
    shape = TinyModelShape()
    path = write_tiny_model(tmp_path / "tiny.gguf", shape=shape, seed=3)
    reader = gguf.GGUFReader(str(path))

    def field(name):
        return reader.fields[name].parts[-1][0]

    assert bytes(reader.fields["general.architecture"].parts[-1]) == b"llama"
    assert field("llama.block_count") == shape.block_count
    assert field("llama.rope.dimension_count") == shape.embedding_length // shape.head_count
    assert field("tokenizer.ggml.eos_token_id") == 2
    names = {tensor.name for tensor in reader.tensors}
    assert len(names) == 3 + 9 * shape.block_count
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert np.asarray(embedding.data).shape == (shape.vocab_size, shape.embedding_length)


def test_same_seed_same_bytes(tmp_path):
    first = write_tiny_model(tmp_path / "a.gguf", seed=1).read_bytes()
    second = write_tiny_model(tmp_path / "b.gguf", seed=1).read_bytes()
    assert first == second
