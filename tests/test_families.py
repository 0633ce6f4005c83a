"""Each model family against transformers' own implementation: tiny random Qwen2, Qwen3, Mistral
and Gemma-3 checkpoints built with transformers' classes and saved as Hugging Face folders, loaded
by fastdecode, compared in float32 on logits and on greedy ids. Mistral's and Gemma-3's sliding
windows are shorter than the prompt, so the window really cuts what a row sees; bad inputs name
what is wrong."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastdecode import LLM, SamplingParams
from fastdecode import cli
from fastdecode.errors import FastDecodeError
from fastdecode.models import gguf_cache
from fastdecode.models.registry import MODELS

WINDOW = 8
COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, tie_word_embeddings=False)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24, rope_local_base_freq=100.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0)),
}


@pytest.fixture(scope="module")
def tokenizer_folder():
    return gguf_cache.prepare(MODELS["smollm2-135m-instruct"].gguf_path(), None)


def save_tiny(family: str, folder, tokenizer_folder, **overrides):
    """A random checkpoint of `family` in `folder`, weights large enough that logits are far from ties."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**COMMON, **{**extra, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() == 2 else p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    shutil.copy(tokenizer_folder / "tokenizer.json", folder / "tokenizer.json")
    info = json.loads((tokenizer_folder / "tokenizer_info.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": info["chat_template"]}))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers(tmp_path, tokenizer_folder, family):
    reference = save_tiny(family, tmp_path, tokenizer_folder)
    llm = LLM(str(tmp_path), "float32")
    model = llm.engine.model
    assert model.config.architecture == family
    ids = llm.prompt_ids("Hello there, how are you today? Tell me a story about a dragon.")
    assert len(ids) > 3 * WINDOW
    ours = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())
    result = llm.generate("Tell me a story about a dragon.", SamplingParams(max_new_tokens=16, ignore_eos=True), method="ar")
    prompt = llm.prompt_ids("Tell me a story about a dragon.")
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert result.token_ids == out[0, len(prompt):].tolist()
    # speculation on the family: the same ids (ngram drafts from the prompt; layerskip runs a subset of layers)
    for method in ("ngram", "layerskip"):
        again = llm.generate("Tell me a story about a dragon.", SamplingParams(max_new_tokens=16, ignore_eos=True), method=method)
        assert again.token_ids == result.token_ids


def test_an_unsupported_architecture_names_itself_and_the_supported(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "num_attention_heads": 4}))
    with pytest.raises(FastDecodeError, match=r"'phi3' is not supported; fastdecode runs: gemma3_text, llama, mistral, qwen2, qwen3"):
        LLM(str(tmp_path))
    assert cli.main(["generate", "hi", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "phi3" in err and "Traceback" not in err


def test_a_missing_tensor_is_named(tmp_path, tokenizer_folder, capsys):
    from safetensors.torch import load_file, save_file

    save_tiny("qwen2", tmp_path, tokenizer_folder)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["model.layers.1.self_attn.k_proj.bias"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(FastDecodeError, match=r"no tensor 'model.layers.1.self_attn.k_proj.bias'"):
        LLM(str(tmp_path), "float32")
    assert cli.main(["generate", "hi", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.k_proj.bias" in err and "Traceback" not in err


GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "llama", "gemma3": "gemma3"}
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GEMMA_NAMES = {**GGUF_NAMES, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def write_gguf(family: str, reference, path, tokenizer_gguf) -> None:
    """The checkpoint as llama.cpp's converter writes it: its tensor names, q/k rows permuted for
    its llama architecture, Gemma's norm weights with 1 added, and the default model's tokenizer."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    arch, c = GGUF_ARCH[family], reference.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters.get("rope_theta", None) or c.rope_parameters["full_attention"]["rope_theta"])
    if getattr(c, "sliding_window", None):
        writer.add_sliding_window(c.sliding_window)
    if family == "gemma3":
        writer.add_uint32("gemma3.attention.sliding_window_pattern", 2)  # layer 1 of 0..2 global
    source = GGUFReader(str(tokenizer_gguf))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.chat_template"):
        field = source.fields[key]
        value = field.contents()
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, int(value))
    names = GEMMA_NAMES if family == "gemma3" else GGUF_NAMES

    def permute(w, heads):
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for name, tensor in reference.state_dict().items():
        w = tensor.float().numpy().copy()
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if family == "gemma3" and name.endswith("norm.weight"):
            w = w + np.float32(1)
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        if name in top:
            writer.add_tensor(top[name], w)
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        part, kind = rest.rsplit(".", 1)
        if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
            w = permute(w, c.num_attention_heads if part == "self_attn.q_proj" else c.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{names[part]}.{kind}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_from_a_gguf_file(tmp_path, tokenizer_folder, family):
    # A Gemma-3 GGUF has no keys for these: llama.cpp's values (a base of 10k, head_dim) are assumed.
    gemma_defaults = dict(rope_local_base_freq=10000.0, query_pre_attn_scalar=16) if family == "gemma3" else {}
    reference = save_tiny(family, tmp_path / "hf", tokenizer_folder, **gemma_defaults)
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(family, reference, path, MODELS["smollm2-135m-instruct"].gguf_path())
    llm = LLM(str(path), "float32")
    model = llm.engine.model
    assert model.config.architecture == ("llama" if family == "mistral" else family)
    assert llm.tokenizer.info.chat_template  # the file's own
    ids = llm.prompt_ids("Hello there, how are you today? Tell me a story about a dragon.")
    ours = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())
