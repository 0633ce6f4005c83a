"""Weight formats (`--weights`): what each loads, what the default is, the one-line fallback for GGUF
types without a kernel, and the clear refusal of `gguf` for a checkpoint folder."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from fastdecode import cli
from fastdecode.errors import FastDecodeError
from fastdecode.models import gguf_cache
from fastdecode.models.config import ModelConfig
from fastdecode.models.gguf_file import GGUFFile
from fastdecode.models.loader import load
from fastdecode.models.quant import PackedMatrix
from fastdecode.models.registry import MODELS
from fastdecode.models.weights import gguf_weights, resolve

DEFAULT = "smollm2-135m-instruct"


def test_defaults_and_refusals(tmp_path):
    gguf = MODELS[DEFAULT].gguf_path()
    assert resolve(gguf, None, torch.bfloat16) == "gguf"
    (tmp_path / "config.json").write_text("{}")
    assert resolve(tmp_path, None, torch.bfloat16) == "bfloat16"  # a checkpoint's weights in the dtype
    assert resolve(tmp_path, "q8_0", torch.bfloat16) == "q8_0"
    with pytest.raises(FastDecodeError, match="--weights gguf needs a .gguf file"):
        resolve(tmp_path, "gguf", torch.float32)
    with pytest.raises(FastDecodeError, match="unknown weight format"):
        resolve(gguf, "q4_0", torch.float32)


def test_gguf_on_a_checkpoint_folder_exits_2(tmp_path, capsys):
    folder = gguf_cache.prepare(MODELS[DEFAULT].gguf_path(), None)  # a config.json is all it needs
    assert cli.main(["generate", "hi", "--model", str(folder), "--weights", "gguf"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --weights gguf needs a .gguf file")


def test_gguf_weights_are_the_files_blocks(llm):
    """The session model (float32, default weights) holds the file's Q4_1 and Q8_0 blocks: about the
    file's size, one copy of the tied embedding, and embedding rows equal to the file's values."""
    model = llm.engine.model
    assert model.weight_format == "Q4_1+Q8_0" and model.head_matrix is model.embedding
    gguf = GGUFFile(MODELS[DEFAULT].gguf_path())
    infos = {t.name: t for t in gguf.tensor_infos()}
    packed = sum(p.nbytes for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
                 for p in lin.parts) + model.embedding.nbytes
    in_file = sum(t.n_bytes for t in infos.values() if len(t.shape) == 2)
    assert in_file <= packed < 1.01 * in_file
    ids = torch.tensor([0, 17, 49151])
    expected = gguf.tensor("token_embd.weight")[ids.numpy()]
    assert np.array_equal(model.embed_tokens(ids).numpy(), expected)
    assert torch.equal(model.head_rows(ids), model.embed_tokens(ids))


def test_partial_head_gives_the_full_heads_logits(llm):
    model = llm.engine.model
    hidden = torch.randn(3, model.config.hidden_size)
    ids = torch.tensor([5, 49000, 17, 333])
    assert torch.equal(model.partial_head(ids)(hidden), model.lm_head(hidden)[:, ids])  # bitwise


def _tiny_gguf(path, q_type: GGMLQuantizationType):
    """A GGUF file holding some llama tensors: a Q8_0 embedding, one layer's q in `q_type`, a norm."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    tensors = {"token_embd.weight": (GGMLQuantizationType.Q8_0, rng.normal(size=(64, 64))),
               "blk.0.attn_q.weight": (q_type, rng.normal(size=(64, 64))),
               "output_norm.weight": (GGMLQuantizationType.F32, rng.normal(size=64))}
    for name, (kind, values) in tensors.items():
        data = quantize(values.astype(np.float32), kind)
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: dequantize(quantize(v.astype(np.float32), k), k) for name, (k, v) in tensors.items()}


def test_a_type_without_kernel_loads_as_q8_0_and_says_so(tmp_path, capsys):
    values = _tiny_gguf(tmp_path / "tiny.gguf", GGMLQuantizationType.Q5_1)
    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64)
    infos = GGUFFile(tmp_path / "tiny.gguf").tensor_infos()
    weights = gguf_weights(tmp_path / "tiny.gguf", infos, config)
    err = capsys.readouterr().err
    assert err == "fastdecode: tiny.gguf: no kernel for Q5_1 (1 tensors); quantized to q8_0 at load\n"
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q, PackedMatrix) and q.source == "q8_0"
    embed = weights["model.embed_tokens.weight"]
    assert embed.source == "Q8_0" and np.array_equal(embed.dequantize().numpy(), values["token_embd.weight"])
    assert torch.equal(weights["model.norm.weight"], torch.from_numpy(values["output_norm.weight"]))
    # Q8_0 of the file's Q5_1 values (rows unpermuted), as quantize_q8_0 rounds (llama.cpp's way: test_kernels.py)
    from fastdecode.models.gguf_file import unpermute_rows
    from fastdecode.models.quant import quantize_q8_0

    exact = torch.from_numpy(unpermute_rows(values["blk.0.attn_q.weight"], 2).copy())
    assert torch.equal(q.dequantize(), quantize_q8_0(exact).dequantize())


@pytest.mark.parametrize("weights, format_", [("q8_0", "Q8_0+q8_0"), ("bfloat16", "bfloat16")])
def test_other_formats_load(weights, format_):
    model = load(DEFAULT, "float32", weights).model
    assert model.weight_format == format_ and model.dtype == torch.float32
    logits = model.forward(torch.tensor([1, 2, 3]), torch.arange(3), model.new_cache(3))
    assert logits.shape == (3, 49152) and torch.isfinite(logits).all()
