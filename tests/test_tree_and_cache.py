"""Tree attention and the KV cache: a tree forward equals each root-to-leaf path run on its own,
and rollback / keep leave the cache as a fresh computation of the kept tokens would."""
from __future__ import annotations

import pytest
import torch

from fastdecode.runtime.tree import DraftTree
from fastdecode.runtime.verify import verify_greedy

# Root-relative tree: 0 and 1 are children of the root, 2 and 3 of node 0, 4 of node 3, 5 of node 1.
TREE = DraftTree(tokens=[11, 12, 13, 14, 15, 16], parents=[-1, -1, 0, 0, 3, 1])
PREFIX = [5, 9, 31, 7, 2, 44, 60, 8]


def prefill(model, tokens, capacity=64):
    cache = model.new_cache(capacity)
    model.forward(torch.tensor(tokens), torch.arange(len(tokens)), cache)
    cache.commit(len(tokens))
    return cache


def tree_forward(model, cache, root, tree):
    rows = torch.tensor([root] + tree.tokens)
    positions = cache.length + torch.tensor([0] + tree.depths())
    return model.forward(rows, positions, cache, tree.attention_mask())


def test_tree_helpers():
    assert TREE.depths() == [1, 1, 2, 2, 3, 2]
    assert TREE.paths() == [[0, 2], [0, 3, 4], [1, 5]]
    mask = TREE.attention_mask()
    assert mask[5].tolist() == [True, True, False, False, True, True, False]  # node 4: root, 0, 3, itself
    assert DraftTree.chain([4, 5, 6]).parents == [-1, 0, 1]
    with pytest.raises(ValueError):
        DraftTree(tokens=[1, 2], parents=[-1, 1])


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_tree_forward_equals_each_path_alone(which, tiny_model, llm):
    model = tiny_model if which == "tiny" else llm.engine.model
    root = PREFIX[-1]
    cache = prefill(model, PREFIX[:-1])
    logits = tree_forward(model, cache, root, TREE)
    for path in TREE.paths():
        alone = prefill(model, PREFIX[:-1])
        chain = [root] + [TREE.tokens[i] for i in path]
        expected = model.forward(torch.tensor(chain), alone.length + torch.arange(len(chain)), alone)
        rows = [0] + [i + 1 for i in path]
        torch.testing.assert_close(logits[rows], expected, rtol=1e-4, atol=1e-4)


def test_keep_and_rollback_match_fresh_computation(tiny_model):
    model = tiny_model
    root = PREFIX[-1]
    cache = prefill(model, PREFIX[:-1])
    tree_forward(model, cache, root, TREE)
    path = TREE.paths()[1]  # nodes 0, 3, 4
    cache.keep([0] + [i + 1 for i in path])
    kept = PREFIX + [TREE.tokens[i] for i in path]
    fresh = prefill(model, kept)
    assert cache.length == fresh.length == len(kept)
    for layer in range(model.config.num_layers):
        torch.testing.assert_close(cache.keys(layer, cache.length), fresh.keys(layer, fresh.length), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values(layer, cache.length), fresh.values(layer, fresh.length), rtol=1e-5, atol=1e-5)
    # The next token's logits agree too, so decoding can go on from the kept cache.
    nxt = torch.tensor([3])
    a = model.forward(nxt, torch.tensor([cache.length]), cache)
    b = model.forward(nxt, torch.tensor([fresh.length]), fresh)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    cache.rollback(len(PREFIX) - 3)
    shorter = prefill(model, PREFIX[:-3])
    a = model.forward(nxt, torch.tensor([cache.length]), cache)
    b = model.forward(nxt, torch.tensor([shorter.length]), shorter)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_layer_subset_and_captured_states(tiny_model):
    cache = tiny_model.new_cache(16)
    tokens, positions = torch.tensor([1, 2, 3]), torch.arange(3)
    full, hidden = tiny_model.forward(tokens, positions, cache, capture=(0, 2))
    assert hidden.shape == (3, 2, 32)
    # The last layer's state, normed and through the head, is the logits.
    head = torch.nn.functional.rms_norm(hidden[:, 1], (32,), tiny_model.norm, tiny_model.config.rms_norm_eps)
    torch.testing.assert_close(head @ tiny_model.embed.T, full, rtol=1e-5, atol=1e-5)
    # A prefill chunk wants its last row's logits only, but states of every row.
    last, chunk_hidden = tiny_model.forward(tokens, positions, tiny_model.new_cache(16), last_logits_only=True, capture=(2,))
    assert last.shape == (1, 97) and torch.equal(chunk_hidden[:, 0], hidden[:, 1])
    partial = tiny_model.forward(tokens, positions, tiny_model.new_cache(16), layers=[0, 2])
    assert not torch.allclose(full, partial)  # skipping a layer changes the result...
    assert cache.keys(1, 3).abs().sum() > 0  # ...and the full forward wrote every layer's rows
    skipped = tiny_model.new_cache(16)
    skipped.pool.k.zero_()
    tiny_model.forward(tokens, positions, skipped, layers=[0, 2])
    assert skipped.keys(1, 3).abs().sum() == 0  # the skipped layer's rows stay untouched


def test_cache_capacity_is_enforced(tiny_model):
    from fastdecode.errors import FastDecodeError

    cache = tiny_model.new_cache(4)
    with pytest.raises(FastDecodeError, match="KV cache full"):
        tiny_model.forward(torch.arange(5), torch.arange(5), cache)


def test_verify_greedy_takes_longest_matching_path():
    vocab = 20
    logits = torch.zeros(len(TREE) + 1, vocab)

    def argmax(row, token):
        logits[row, token] = 1.0

    argmax(0, 11)  # root -> node 0 accepted
    argmax(1, 14)  # node 0 -> node 3 (token 14) accepted
    argmax(4, 15)  # node 3 -> node 4 accepted
    argmax(5, 9)  # node 4 -> bonus 9
    assert verify_greedy(TREE, logits) == ([0, 3, 4], 9)
    logits[0] = 0
    argmax(0, 16)  # no child of the root holds 16: nothing accepted, bonus 16
    assert verify_greedy(TREE, logits) == ([], 16)


def test_verify_greedy_never_accepts_past_eos():
    tree = DraftTree.chain([4, 2, 7])  # 2 is EOS
    logits = torch.zeros(4, 10)
    for row, token in enumerate([4, 2, 7, 1]):
        logits[row, token] = 1.0
    path, _ = verify_greedy(tree, logits, eos_ids=frozenset({2}))
    assert path == [0, 1]


def test_a_budgeted_pool_hands_out_blocks_and_takes_them_back(tiny_model):
    from fastdecode.runtime.kv_cache import BLOCK_ROWS, KVCache, KVPoolFull

    pool = tiny_model.new_pool(budget_bytes=3 * tiny_model.new_pool(rows=1).bytes_per_block)
    assert pool.num_blocks == 3 and pool.used_blocks == 0
    a, b = KVCache(pool, 1000), KVCache(pool, 1000)
    a.reserve(BLOCK_ROWS + 1)  # two blocks
    assert pool.used_blocks == 2 and a.room() == 3 * BLOCK_ROWS  # its own two blocks and the free one
    b.reserve(1)
    with pytest.raises(KVPoolFull, match="budget"):
        b.reserve(BLOCK_ROWS + 1)
    assert b.room() == BLOCK_ROWS  # nothing was taken by the failed reserve
    a.release()
    assert pool.used_blocks == 1 and a.length == 0
    b.reserve(3 * BLOCK_ROWS)
    assert pool.used_blocks == 3


def test_a_growing_pool_keeps_rows_across_blocks_and_growth(tiny_model):
    """A cache of many blocks in a pool that doubles as it fills computes what one big block would."""
    from fastdecode.runtime.kv_cache import BLOCK_ROWS, KVCache

    tokens = [(7 * i + 3) % 64 for i in range(3 * BLOCK_ROWS + 5)]
    small = tiny_model.new_pool(rows=1)
    cache = KVCache(small, 1000)
    for begin in range(0, len(tokens), 20):  # chunks that straddle block boundaries
        chunk = tokens[begin : begin + 20]
        tiny_model.forward(torch.tensor(chunk), torch.arange(begin, begin + len(chunk)), cache)
        cache.commit(len(chunk))
    assert small.num_blocks >= 4
    whole = prefill(tiny_model, tokens, capacity=200)
    nxt = torch.tensor([5])
    a = tiny_model.forward(nxt, torch.tensor([cache.length]), cache)
    b = tiny_model.forward(nxt, torch.tensor([whole.length]), whole)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
