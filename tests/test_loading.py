"""Loading real weights: every GGUF tensor type of the embedded models, the weight cache, and
Hugging Face checkpoint folders (checked against transformers' own Llama)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fastdecode import LLM, SamplingParams
from fastdecode.errors import FastDecodeError
from fastdecode.models import gguf_cache
from fastdecode.models.gguf_file import GGUFFile
from fastdecode.models.registry import MODELS


def test_q4_1_dequantization_matches_its_definition():
    gguf = GGUFFile(MODELS["smollm2-135m-instruct"].gguf_path())
    t = next(t for t in gguf.reader.tensors if t.name == "blk.0.attn_q.weight")
    assert t.tensor_type.name == "Q4_1"
    # Q4_1 block of 32 weights: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit q; w = d * q + m,
    # low nibbles are weights 0..15 of the block, high nibbles 16..31.
    block = np.asarray(t.data[0, :20])
    d, m = block[:4].view(np.float16).astype(np.float32)
    q = np.concatenate([block[4:] & 0x0F, block[4:] >> 4]).astype(np.float32)
    ours = gguf.tensor("blk.0.attn_q.weight")
    np.testing.assert_allclose(ours[0, :32], d * q + m, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_every_tensor_type_dequantizes(name):
    entry = MODELS[name]
    if not entry.installed:
        pytest.skip(f"{name} is not installed ({entry.pip_install})")
    gguf = GGUFFile(entry.gguf_path())
    types = set(gguf.tensor_types().values())
    expected = {"smollm2-135m-instruct": {"Q4_1", "Q8_0", "F32"}, "gemma-3-270m": {"Q4_K", "Q6_K"}}[name]
    assert expected <= types
    shapes = {t.name: tuple(reversed([int(d) for d in t.shape])) for t in gguf.reader.tensors}
    for tensor_name, arr in gguf.tensors():
        assert arr.dtype == np.float32 and arr.shape == shapes[tensor_name]
        assert np.isfinite(arr).all(), tensor_name
        assert arr.std() > 0, tensor_name


def test_an_unsupported_gguf_architecture_names_itself(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "phi.gguf"
    writer = GGUFWriter(str(path), "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FastDecodeError, match=r"architecture 'phi2' is not supported; fastdecode runs: gemma3, llama, qwen2, qwen3"):
        LLM(str(path))


def test_weight_cache_is_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path))
    source = MODELS["smollm2-135m-instruct"].gguf_path()
    folder = gguf_cache.prepare(source, torch.bfloat16)
    written = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_info.json", "weights-bfloat16.safetensors"} <= set(written)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert gguf_cache.prepare(source, torch.bfloat16) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == written  # nothing rewritten


def _save_tiny_hf_llama(folder, tokenizer_folder, **config_overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **config_overrides,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    shutil.copy(tokenizer_folder / "tokenizer.json", folder / "tokenizer.json")
    info = json.loads((tokenizer_folder / "tokenizer_info.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": info["chat_template"]}
    ))
    return model


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
])
def test_hugging_face_checkpoint_folder(tmp_path, rope_parameters):
    source = gguf_cache.prepare(MODELS["smollm2-135m-instruct"].gguf_path(), torch.float32)
    reference = _save_tiny_hf_llama(tmp_path, source, rope_parameters=rope_parameters)
    llm = LLM(str(tmp_path), "float32")
    ids = llm.prompt_ids("Hello there, how are you today?") + list(range(300, 400))  # past 64 positions
    model = llm.engine.model
    ours = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    result = llm.generate("Hello", SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert result.num_generated_tokens == 5


def test_bad_model_paths(tmp_path):
    with pytest.raises(FastDecodeError, match="known models: smollm2-135m-instruct"):
        LLM("no-such-model")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FastDecodeError, match="neither a .gguf file nor a folder"):
        LLM(str(tmp_path / "notes.txt"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FastDecodeError, match="not a usable model config"):
        LLM(str(tmp_path / "folder"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(FastDecodeError, match="not a readable GGUF file"):
        LLM(str(bad))
