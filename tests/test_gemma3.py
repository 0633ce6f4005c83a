"""Gemma-3-270M, the second embedded model: the native forward against transformers' own Gemma-3
on the same GGUF file (dequantized, float32), and every lossless method equal to plain decoding
on it. The model's sliding layers (window 512) and its global layers, its QK-norm, sandwich norms,
GeGLU and 262k-token tied head all take part in every forward here."""
from __future__ import annotations

import pytest
import torch

from fastdecode import LLM, SamplingParams
from fastdecode.drafters import METHODS
from fastdecode.heads import make_head, save_head
from fastdecode.models.registry import MODELS
from fastdecode.models.truncate import make_truncated_checkpoint

from conftest import TEST_COST_CURVE

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colours:"]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def gemma():
    llm = LLM("gemma-3-270m", "float32", weights="float32")
    llm.engine.cost_curve = TEST_COST_CURVE
    return llm


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    gguf = MODELS["gemma-3-270m"].gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def test_config_read_from_the_gguf(gemma):
    c = gemma.engine.model.config
    assert (c.architecture, c.num_layers, c.head_dim, c.vocab_size, c.sliding_window) == ("gemma3", 18, 256, 262144, 512)
    assert [i for i in range(18) if not c.window(i)] == [5, 11, 17]  # the 5:1 pattern
    assert c.tie_word_embeddings and c.rope_local_theta == 10000.0 and c.rope_theta == 1e6
    assert gemma.tokenizer.info.chat_template is None  # a base model: prompts go in as plain text


def test_logits_match_transformers(gemma, reference):
    model = gemma.engine.model
    for prompt in PROMPTS[:2]:
        ids = gemma.prompt_ids(prompt)
        assert ids[0] == 2  # <bos>
        ours = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)))
        with torch.no_grad():
            theirs = reference(torch.tensor([ids])).logits[0]
        assert ours.shape == theirs.shape == (len(ids), 262144)
        # float32 rounding of differently ordered sums: ~1e-4 on logits of size ~30 (measured 4e-5 to 8e-5)
        assert (ours - theirs).abs().max().item() < 1e-3
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ids_equal_transformers_generate(gemma, reference, prompt):
    ids = gemma.prompt_ids(prompt)
    ours = gemma.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), method="ar").token_ids
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert ours == out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def options(gemma, tmp_path_factory):
    """What the methods that need more than the model are given: a 6-layer Gemma-3 draft model,
    and untrained heads (random drafts: the point is that whatever is drafted, the output is ar's)."""
    folder = tmp_path_factory.mktemp("gemma")
    opts = {"draft": {"draft_model": str(make_truncated_checkpoint("gemma-3-270m", 6, folder / "draft6"))}}
    torch.manual_seed(0)
    for kind in ("eagle", "medusa", "hydra", "lud"):
        head = make_head(kind, gemma.engine.model, list(range(4096)))
        opts[kind] = {"head": str(save_head(head, folder / kind, {"target": {"model": "gemma-3-270m"}}))}
    return opts


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ar" and METHODS[m].lossless])
def test_every_method_is_lossless_on_gemma(gemma, options, method):
    for prompt in PROMPTS[:2]:
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        plain = gemma.generate(prompt, params, method="ar").token_ids
        result = gemma.generate(prompt, params, method=method, **options.get(method, {}))
        assert result.token_ids == plain, f"{method} differs from ar on {prompt!r}"


def test_generate_on_the_command_line(capsys):
    """`fastdecode generate ... --model gemma-3-270m` in the default dtype and the file's own formats:
    the plain prompt (no chat template) continued, the same ids by ar and by auto."""
    import json

    from fastdecode import cli

    answers = []
    for method in ("ar", "auto"):
        code = cli.main(["generate", "The three largest cities in Japan are", "--model", "gemma-3-270m", "--json",
                         "--max-new-tokens", "12", "--method", method])
        out, err = capsys.readouterr()
        assert code == 0, err
        answers.append(json.loads(out))
    assert answers[0]["token_ids"] == answers[1]["token_ids"]
    assert "Tokyo" in answers[0]["text"]
