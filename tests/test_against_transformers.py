"""The native model against transformers' implementation, on the same GGUF file, in fp32."""
from __future__ import annotations

import pytest
import torch

from fastdecode import SamplingParams
from fastdecode.models.registry import MODELS

PROMPTS = [
    "Tell me about the history of Rome.",
    "Write a Python function that reverses a string.",
    "What is 17 * 23?",
    "Translate 'good morning, my friend' into French.",
]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM

    gguf = MODELS["smollm2-135m-instruct"].gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def test_logits_match_transformers(llm, reference):
    ids = llm.prompt_ids(PROMPTS[0])
    model = llm.engine.model
    ours = model.forward(torch.tensor(ids), torch.arange(len(ids)), model.new_cache(len(ids)))
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape == (len(ids), 49152)
    # Different GEMM kernels sum in different orders: agreement to ~1e-4 on logits of size ~40.
    assert (ours - theirs).abs().max().item() < 2e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ids_equal_transformers_generate(llm, reference, prompt):
    ids = llm.prompt_ids(prompt)
    ours = llm.generate(prompt, SamplingParams(max_new_tokens=40)).token_ids
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=2)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs
