"""A token's logits must not depend on how many other tokens share its forward (bitwise): that is
what makes speculative decoding give exactly the plain decoding output, not only in theory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdecode.kernels import attention, native_lib
from fastdecode.runtime.tree import DraftTree

needs_kernel = pytest.mark.skipif(native_lib() is None, reason="no C compiler: the kernels could not be built")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request):
    from fastdecode.models.loader import load

    return load("smollm2-135m-instruct", request.param).model


def _prefilled(model, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(length + 80)
    model.forward(torch.randint(0, 49152, (length,), generator=g), torch.arange(length), cache)
    cache.commit(length)
    return cache


@needs_kernel
@pytest.mark.parametrize("n", [2, 8, 32])
def test_a_token_alone_equals_the_same_token_among_others(model, n):
    cache = _prefilled(model, 200)
    tokens = torch.randint(0, 49152, (n,), generator=torch.Generator().manual_seed(n))
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
    other = torch.randint(0, 49152, (n - 1,), generator=torch.Generator().manual_seed(99))
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernel_matches_pytorch(dtype):
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, start, n = 6, 2, 64, 37, 5
    keys = torch.randn(kv_heads, start + n, d, generator=g).to(dtype)
    values = torch.randn(kv_heads, start + n, d, generator=g).to(dtype)
    q = torch.randn(n, heads, d, generator=g)
    tree = DraftTree([1, 2, 3, 4], [-1, 0, -1, 2])
    mask = tree.attention_mask()
    out = attention(native_lib(), q, keys.transpose(1, 2).contiguous(), values, start, mask, d**-0.5)
    full = torch.cat([torch.ones(n, start, dtype=torch.bool), mask], dim=1)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys.float().repeat_interleave(3, 0), values.float().repeat_interleave(3, 0),
        attn_mask=full, scale=d**-0.5,
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_sequences_in_one_batched_forward_equal_each_alone(model):
    """Continuous batching stacks several sequences' rows in one forward, each with its own cache:
    a prefill chunk, a decode step and a draft tree side by side must each give, bitwise, what they
    give alone, and leave the same rows in their caches."""
    from fastdecode.models.llama import Segment

    g = torch.Generator().manual_seed(7)
    tree = DraftTree([5, 6, 7, 8], [-1, 0, -1, 2])
    tree_mask = tree.attention_mask()  # the root row, then the 4 nodes
    caches = [_prefilled(model, length, seed) for length, seed in ((30, 1), (120, 2), (0, 3))]
    shapes = [(1, None), (5, tree_mask), (17, None)]  # decode step, tree (root + 4 nodes), prefill chunk
    segments = []
    for cache, (n, mask) in zip(caches, shapes):
        positions = cache.length + (torch.arange(n) if mask is None else torch.tensor([0] + tree.depths()))
        segments.append(Segment(torch.randint(0, 49152, (n,), generator=g), positions, cache, mask))

    alone = [model.forward(s.tokens, s.positions, s.cache, s.mask) for s in segments]
    rows_alone = [(s.cache.k.clone(), s.cache.v.clone()) for s in segments]
    for s in segments:  # wipe the uncommitted rows, so the batched forward must write them again
        s.cache.k[..., s.cache.length :] = 0
        s.cache.v[:, :, s.cache.length :] = 0
    batched = model.forward_batch(segments)

    assert torch.equal(batched, torch.cat(alone))
    for s, (k, v) in zip(segments, rows_alone):
        end = s.cache.length + len(s.tokens)
        assert torch.equal(s.cache.k[..., s.cache.length : end], k[..., s.cache.length : end])
        assert torch.equal(s.cache.v[:, :, s.cache.length : end], v[:, :, s.cache.length : end])
    segments[2].last_only = True  # a prefill chunk needs its last row's logits only
    mixed = model.forward_batch(segments)
    assert torch.equal(mixed, torch.cat([alone[0], alone[1], alone[2][-1:]]))
