"""Shared fixtures. The real default model loads once per test session (about a second once its
weight cache exists; the first run converts the GGUF file, about 15 s)."""
from __future__ import annotations

import pytest
import torch

from fastdecode.models.config import ModelConfig
from fastdecode.models.llama import LlamaModel
from fastdecode.runtime.cost_curve import CostCurve

# How much of a draft gets verified follows this machine's measured cost curve, which swings with
# load. The shared models use this one instead (a bfloat16 curve measured on the 2-core CPU this
# project is built on), so that what the drafters' tests see drafted does not depend on timing.
# Measuring and storing a curve is tested through `fastdecode calibrate` in test_cli.py.
TEST_COST_CURVE = CostCurve([1, 4, 8, 16, 32, 64], [0.0144, 0.0167, 0.0203, 0.0288, 0.0487, 0.0855])


@pytest.fixture(scope="session", autouse=True)
def calibration_kept_out_of_the_user_cache(tmp_path_factory):
    """Curves measured during the suite (on busy cores, some for throwaway models) go to a
    temporary folder: stored in the user's cache, they would size the user's later drafts. An
    environment variable, so that the tests' child processes (a CLI run, another kernel path)
    write there too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTDECODE_CALIBRATION", str(tmp_path_factory.mktemp("calibration")))
        yield


@pytest.fixture(scope="session")
def llm():
    from fastdecode import LLM

    model = LLM("smollm2-135m-instruct", "float32")
    model.engine.cost_curve = TEST_COST_CURVE
    return model


@pytest.fixture(scope="session")
def llm_default():
    """The default model in the default dtype, as a user meets it."""
    from fastdecode import LLM

    model = LLM()
    model.engine.cost_curve = TEST_COST_CURVE
    return model


@pytest.fixture(scope="session")
def tokenizer(llm):
    return llm.tokenizer


TINY = ModelConfig(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
    head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
)


def tiny_weights(config: ModelConfig = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Hugging Face names for a tiny Llama."""
    g = torch.Generator().manual_seed(seed)
    c = config
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    w = {"model.embed_tokens.weight": r(c.vocab_size, c.hidden_size), "model.norm.weight": 1 + r(c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = 1 + r(c.hidden_size)
        w[f"{p}.post_attention_layernorm.weight"] = 1 + r(c.hidden_size)
        w[f"{p}.self_attn.q_proj.weight"] = r(c.num_heads * c.head_dim, c.hidden_size)
        w[f"{p}.self_attn.k_proj.weight"] = r(c.num_kv_heads * c.head_dim, c.hidden_size)
        w[f"{p}.self_attn.v_proj.weight"] = r(c.num_kv_heads * c.head_dim, c.hidden_size)
        w[f"{p}.self_attn.o_proj.weight"] = r(c.hidden_size, c.num_heads * c.head_dim)
        w[f"{p}.mlp.gate_proj.weight"] = r(c.intermediate_size, c.hidden_size)
        w[f"{p}.mlp.up_proj.weight"] = r(c.intermediate_size, c.hidden_size)
        w[f"{p}.mlp.down_proj.weight"] = r(c.hidden_size, c.intermediate_size)
    return w


@pytest.fixture
def tiny_model() -> LlamaModel:
    return LlamaModel(TINY, tiny_weights(), torch.float32)


def byte_tokenizer(folder, vocab_size: int, eos_id: int):
    """A tokenizer whose ids 0 .. vocab_size - 1 are single bytes (for tiny models in an Engine)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from fastdecode.tokenizer import Tokenizer, TokenizerInfo

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:vocab_size]
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder / "tokenizer.json", TokenizerInfo(None, None, None, eos_ids=[eos_id]))
