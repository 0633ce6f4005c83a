"""A token's logits must not depend on how many other tokens share its forward (bitwise): that is
what makes speculative decoding give exactly the plain decoding output, not only in theory. Checked
for the real model in every dtype and weight format (the GGUF file's own Q4_1 / Q8_0, dequantized
bfloat16 and float32, and Q8_0 quantized at load), and for tiny models with every option of the
layer kernel (a Gemma-3 with QK-norm, post-norms, GeGLU and sliding windows shorter than the rows;
a Qwen2 with q/k/v biases); tests/test_kernels.py checks every block format's product on its own."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdecode.kernels import attention, native_lib
from fastdecode.runtime.tree import DraftTree

needs_kernel = pytest.mark.skipif(native_lib() is None, reason="no C compiler: the kernels could not be built")


FORMATS = [("float32", "gguf"), ("bfloat16", "gguf"), ("float32", "float32"), ("bfloat16", "bfloat16"),
           ("bfloat16", "q8_0")]
TINY_FAMILIES = [("gemma3", torch.float32), ("gemma3", torch.bfloat16), ("qwen2", torch.bfloat16)]
WINDOW = 6  # shorter than the chains, trees and prefills below


def tiny_family(architecture: str, dtype: torch.dtype):
    """A tiny random model of a family, with the layer options that family sets."""
    from dataclasses import replace

    from fastdecode.models.families import build

    from conftest import TINY, tiny_weights

    config = replace(TINY, architecture=architecture, max_position_embeddings=512, num_layers=3)
    w = tiny_weights(config)
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        if architecture == "gemma3":
            w[f"{p}.pre_feedforward_layernorm.weight"] = r(config.hidden_size)
            w[f"{p}.post_feedforward_layernorm.weight"] = r(config.hidden_size)
            w[f"{p}.self_attn.q_norm.weight"] = r(config.head_dim)
            w[f"{p}.self_attn.k_norm.weight"] = r(config.head_dim)
        else:
            for name, rows in (("q", config.num_heads), ("k", config.num_kv_heads), ("v", config.num_kv_heads)):
                w[f"{p}.self_attn.{name}_proj.bias"] = r(rows * config.head_dim)
    if architecture == "gemma3":
        config = replace(config, sliding_window=WINDOW, rope_local_theta=100.0, query_pre_attn_scalar=12.0,
                         layer_types=("sliding_attention", "full_attention", "sliding_attention"))
    else:
        config = replace(config, attention_bias=True, sliding_window=WINDOW)  # every layer sliding
    return build(config, w, dtype)


@pytest.fixture(scope="module", params=[("smollm2", f) for f in FORMATS] + [("tiny", f) for f in TINY_FAMILIES],
                ids=[f"{d}-{w}" for d, w in FORMATS] + [f"tiny-{a}-{str(d)[6:]}" for a, d in TINY_FAMILIES])
def model(request):
    from fastdecode.models.loader import load

    kind, (a, b) = request.param
    return load("smollm2-135m-instruct", a, b).model if kind == "smollm2" else tiny_family(a, b)


def _vocab(model) -> int:
    return model.config.vocab_size


def _prefilled(model, length: int, seed: int = 0, pool=None):
    from fastdecode.runtime.kv_cache import KVCache

    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(length + 80) if pool is None else KVCache(pool, length + 80)
    model.forward(torch.randint(0, _vocab(model), (length,), generator=g), torch.arange(length), cache)
    cache.commit(length)
    return cache


@needs_kernel
@pytest.mark.parametrize("n", [2, 8, 32])
def test_a_token_alone_equals_the_same_token_among_others(model, n):
    cache = _prefilled(model, 200)
    tokens = torch.randint(0, _vocab(model), (n,), generator=torch.Generator().manual_seed(n))
    start = cache.length
    alone = [model.forward(tokens[:1], torch.tensor([start]), cache)[0]]
    # Decoded one at a time, as plain decoding does.
    for i in range(1, n):
        cache.commit(1)
        alone.append(model.forward(tokens[i : i + 1], torch.tensor([start + i]), cache)[0])
    cache.rollback(start)
    chain = model.forward(tokens, torch.arange(start, start + n), cache)
    assert torch.equal(chain, torch.stack(alone))

    # The same chain hidden inside a tree: a second branch of n - 1 other tokens under the root.
    other = torch.randint(0, _vocab(model), (n - 1,), generator=torch.Generator().manual_seed(99))
    tree = DraftTree(
        other.tolist() + tokens[1:].tolist(),
        list(range(-1, n - 2)) + [-1] + list(range(n - 1, 2 * n - 3)),
    )
    rows = torch.cat([tokens[:1], torch.tensor(tree.tokens)])
    positions = start + torch.tensor([0] + tree.depths())
    logits = model.forward(rows, positions, cache, tree.attention_mask())
    branch = [0] + list(range(n, 2 * n - 1))  # the root row, then the second branch's rows
    assert torch.equal(logits[branch], chain)


@needs_kernel
@pytest.mark.parametrize("window", [0, 4, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_kernel_matches_pytorch(dtype, window):
    out, reference = paged_attention_case(native_lib(), dtype, window)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


TREE_AND_CHUNK = [(37, [7, 2], DraftTree([1, 2, 3, 4], [-1, 0, -1, 2])), (70, [0, 11, 4], 3)]


def paged_attention_case(lib, dtype: torch.dtype, window: int, sequences=TREE_AND_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Several sequences in one call, each over its own blocks scattered through a shared pool:
    (committed rows, blocks, a draft tree or a number of causal new rows). By default a draft tree
    over 37 committed rows and a causal chunk of 3 rows after 70. Returns the kernel's output and
    PyTorch's."""
    from fastdecode.runtime.kv_cache import BLOCK_ROWS as B

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 6, 2, 64
    pool_k = torch.full((12, kv_heads, d, B), float("nan")).to(dtype)  # unused slots must never be read
    pool_v = torch.full((12, kv_heads, B, d), float("nan")).to(dtype)
    sequences = [(start, len(new) + 1 if isinstance(new, DraftTree) else new, blocks, new if isinstance(new, DraftTree) else None)
                 for start, blocks, new in sequences]  # committed, new rows (a tree's root too), blocks, tree
    q = torch.randn(sum(n for _, n, _, _ in sequences), heads, d, generator=g)
    meta, tables, masks, row, refs = [], [], [], 0, []
    for start, n, blocks, tree in sequences:
        mask = None if tree is None else tree.attention_mask()
        keys = torch.randn(kv_heads, start + n, d, generator=g).to(dtype)
        values = torch.randn(kv_heads, start + n, d, generator=g).to(dtype)
        for j in range(start + n):
            pool_k[blocks[j // B], :, :, j % B] = keys[:, j]
            pool_v[blocks[j // B], :, j % B] = values[:, j]
        meta.append([row, n, start, sum(map(len, tables)), -1 if mask is None else sum(map(len, masks))])
        tables.append(torch.tensor(blocks))
        if mask is not None:
            masks.append(mask.to(torch.uint8).flatten())
        new = mask if mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
        full = torch.cat([torch.ones(n, start, dtype=torch.bool), new], dim=1)
        if window:  # a query at position p sees the keys at positions > p - window
            depths = torch.tensor([0] + tree.depths()) if tree is not None else torch.arange(n)
            key_positions = torch.cat([torch.arange(start), start + depths])
            full &= key_positions[None, :] > (start + depths)[:, None] - window
        refs.append(F.scaled_dot_product_attention(
            q[row : row + n].transpose(0, 1), keys.float().repeat_interleave(3, 0),
            values.float().repeat_interleave(3, 0), attn_mask=full, scale=d**-0.5).transpose(0, 1))
        row += n
    masks = torch.cat(masks) if masks else None
    out = attention(lib, q, pool_k, pool_v, torch.tensor(meta), torch.cat(tables), masks, d**-0.5, window)
    return out, torch.cat(refs)


@needs_kernel
def test_sequences_in_one_batched_forward_equal_each_alone(model):
    """Continuous batching stacks several sequences' rows in one forward, each with its own cache:
    a prefill chunk, a decode step and a draft tree side by side must each give, bitwise, what they
    give alone, and leave the same rows in their caches. The chunk ends past its prompt (as when a
    preempted sequence prefills its generated tokens again): its prompt rows may take the AMX path
    and the rest the vector path, within one forward."""
    from fastdecode.models.llama import Segment

    g = torch.Generator().manual_seed(7)
    tree = DraftTree([5, 6, 7, 8], [-1, 0, -1, 2])
    tree_mask = tree.attention_mask()  # the root row, then the 4 nodes
    shapes = [(1, None), (5, tree_mask), (17, None)]  # decode step, tree (root + 4 nodes), prefill chunk
    prompt_rows = [0, 0, 11]
    tokens = [torch.randint(0, _vocab(model), (n,), generator=g) for n, _ in shapes]

    def run(batched: bool):
        pool = model.new_pool(rows=512)
        # The pool starts as garbage (NaN): the unwritten tail of each sequence's last block is
        # the only padding there is, and it must not leak into any result.
        pool.k.fill_(float("nan"))
        pool.v.fill_(float("nan"))
        segments = []
        for (length, seed), toks, (n, mask), prompt in zip(((30, 1), (120, 2), (0, 3)), tokens, shapes, prompt_rows):
            cache = _prefilled(model, length, seed, pool)
            positions = cache.length + (torch.arange(n) if mask is None else torch.tensor([0] + tree.depths()))
            segments.append(Segment(toks, positions, cache, mask, prompt_rows=prompt))
        if batched:
            logits = model.forward_batch(segments)
        else:
            logits = torch.cat([model.forward_batch([s]) for s in segments])
        rows = [[(s.cache.keys(i, s.cache.length + len(s.tokens)), s.cache.values(i, s.cache.length + len(s.tokens)))
                 for i in range(model.config.num_layers)] for s in segments]
        return logits, rows, segments

    alone, rows_alone, _ = run(batched=False)
    batched, rows_batched, segments = run(batched=True)
    assert not alone.isnan().any()
    assert torch.equal(batched, alone)
    for seq_alone, seq_batched in zip(rows_alone, rows_batched):  # the same rows left in every cache
        for (k1, v1), (k2, v2) in zip(seq_alone, seq_batched):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
    segments[2].last_only = True  # a prefill chunk needs its last row's logits only
    mixed = model.forward_batch(segments)
    assert torch.equal(mixed, torch.cat([alone[:6], alone[-1:]]))


@needs_kernel
def test_prompt_rows_take_their_own_path_where_the_kernels_have_one(model):
    """Where prompt rows run on AMX tiles (bfloat16 activations on a CPU with AMX), a prompt row's
    logits are not the vector path's: the test above then really mixes two paths in one forward."""
    from fastdecode.models.llama import Segment

    tokens = torch.randint(0, _vocab(model), (9,), generator=torch.Generator().manual_seed(3))

    def logits(prompt_rows: int) -> torch.Tensor:
        return model.forward_batch([Segment(tokens, torch.arange(9), model.new_cache(16), prompt_rows=prompt_rows)])

    assert torch.equal(logits(9), logits(9))
    assert torch.equal(logits(9), logits(0)) != model.prompt_rows_differ


@needs_kernel
def test_the_prompts_only_path_too():
    """FASTDECODE_AMX=prompts puts only a prompt's rows on AMX tiles (every row goes there by
    default): the two tests above, and the prefix cache's real second turn, in a process on that
    path, where a forward really mixes the two paths and an answer's rows are not shared."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastdecode.kernels import kernel_description

    if "AMX" not in kernel_description():
        pytest.skip("this CPU (or its operating system) offers no AMX tiles")
    here = Path(__file__).parent
    tests = [f"{here / 'test_batch_invariance.py'}::test_sequences_in_one_batched_forward_equal_each_alone",
             f"{here / 'test_batch_invariance.py'}::test_prompt_rows_take_their_own_path_where_the_kernels_have_one",
             f"{here / 'test_prefix_cache.py'}::test_real_chat_second_turn_reuses_the_first_turn_and_its_answer"]
    code = ("import sys, pytest\nfrom fastdecode.kernels import kernel_description\n"
            "assert 'for prompts' in kernel_description(), kernel_description()\n"
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{tests!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "FASTDECODE_AMX": "prompts"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout
