"""Prefix caching (runtime/prefix_cache.py, runtime/kv_cache.py, sequence.py, scheduler.py): requests
whose prompts start alike share the KV blocks of that prefix instead of prefilling it again, and
every output is exactly what it is without the cache (the rows are bitwise the same)."""
from __future__ import annotations

import pytest
import torch

from fastdecode.drafters import make_drafter
from fastdecode.drafters.autoregressive import Autoregressive
from fastdecode.runtime.kv_cache import BLOCK_ROWS, KVCache, KVPool, KVPoolFull
from fastdecode.runtime.prefix_cache import ROOT, block_key, chain_keys
from fastdecode.runtime.sampling import SamplingParams
from fastdecode.scheduler import Scheduler

from conftest import TINY, byte_tokenizer, tiny_weights
from prompts import EXERCISE, LIGHTHOUSE, SEASONS

B = BLOCK_ROWS
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.9, seed=7)


def method_for(params: SamplingParams) -> str:
    """Greedy output is the same whatever gets drafted; a seeded sample is the same only for the same
    drafts (rejection sampling draws per draft node), and drafts are sized on the batch, which the
    cache changes (a request that adopts a prefix decodes sooner). So sampled runs draft nothing."""
    return "ngram" if params.greedy else "ar"


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 90, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    from fastdecode.engine import Engine
    from fastdecode.models.llama import LlamaModel
    from fastdecode.runtime.cost_curve import CostCurve

    model = LlamaModel(TINY, tiny_weights(), torch.float32)
    engine = Engine(model, byte_tokenizer(tmp_path_factory.mktemp("tok"), TINY.vocab_size, eos_id=96), "tiny")
    engine.cost_curve = CostCurve([1, 8, 64], [0.01, 0.011, 0.03])  # cheap rows: drafts get verified
    return engine


def prefill_rows(engine, monkeypatch) -> list[int]:
    """Counts the prompt rows every forward reads from now on (a one-item list, updated)."""
    count, forward = [0], engine.model.forward_batch

    def counting(segments, *args, **kwargs):
        count[0] += sum(len(s.tokens) for s in segments if s.last_only)
        return forward(segments, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward_batch", counting)
    return count


def no_leaks(pool: KVPool) -> None:
    """No cache references a block, and each block is either free or cached, once."""
    assert pool.used_blocks == 0 and not any(pool.refs)
    assert sorted(pool.free + list(pool.prefix.idle)) == list(range(pool.num_blocks))


def one_after_another(engine, prompts, params, prefix_cache, method="ngram", **kwargs):
    scheduler = Scheduler(engine, prefix_cache=prefix_cache, **kwargs)
    results = []
    for prompt in prompts:
        request = scheduler.submit(prompt, params, make_drafter(method))
        scheduler.run()
        results.append(request.result.token_ids)
    return results, scheduler


def test_a_block_key_names_the_whole_prefix():
    a, b = tokens(B, 1), tokens(B, 2)
    assert list(chain_keys(a + b + a[:5], B)) == [block_key(ROOT, a), block_key(block_key(ROOT, a), b)]
    assert block_key(block_key(ROOT, b), a) != block_key(ROOT, a)  # same tokens after another prefix
    assert list(chain_keys(a[:-1], B)) == []  # only full blocks have keys


def test_the_pool_counts_references_and_evicts_the_least_recently_used():
    pool = KVPool(1, 1, 16, torch.float32, budget_bytes=4 * KVPool(1, 1, 16, torch.float32, rows=1).bytes_per_block)
    ta, tb = tokens(2 * B, 1), tokens(B, 2)

    def filled(rows, toks):
        cache = KVCache(pool, 4 * B)
        cache.reserve(rows)
        cache.commit(rows)
        cache.publish(toks)
        return cache

    a, b = filled(2 * B, ta), filled(B + 3, tb)  # b's second block is not full: never published
    a0, a1 = a.blocks
    with pytest.raises(ValueError, match="may be shared"):
        a.rollback(B)  # its published rows would be written again
    assert pool.used_blocks == 4 and pool.cached_blocks == 0
    a.release()
    b.release()
    assert pool.used_blocks == 0 and pool.cached_blocks == 3 and len(pool.free) == 1

    c, d = KVCache(pool, 4 * B), KVCache(pool, 4 * B)
    assert c.adopt(ta + [5], 2 * B) == 2 * B and c.blocks == [a0, a1]  # shared, read-only
    assert d.adopt(ta, B) == B and d.blocks == [a0]  # capped at whole blocks under the limit
    assert pool.used_blocks == 2 and pool.refs[a0] == 2 and pool.cached_blocks == 1
    d.release()
    assert pool.refs[a0] == 1 and pool.cached_blocks == 1  # still c's
    c.release()  # now the LRU queue is b0, then a1 (a chain's tail leaves first), then a0

    e = KVCache(pool, 4 * B)
    e.reserve(2 * B)  # the free block first, then the oldest cached one: b's
    assert pool.cached_blocks == 2 and len(pool.free) == 0
    assert len(pool.prefix.match(chain_keys(tb, B))) == 0 and len(pool.prefix.match(chain_keys(ta, B))) == 2
    e.reserve(3 * B)  # then a1: a0 still holds ta's first block
    assert len(pool.prefix.match(chain_keys(ta, B))) == 1 and a1 in e.blocks
    e.reserve(4 * B)
    with pytest.raises(KVPoolFull):
        KVCache(pool, B).reserve(1)  # every block referenced: nothing to evict
    e.release()
    no_leaks(pool)
    assert pool.prefix_queries == len(ta) + 1 + len(ta) and pool.prefix_hits == 3 * B


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_adopted_rows_and_the_first_logits_are_bitwise_those_of_a_fresh_prefill(which, tiny_model, llm_default):
    model = tiny_model if which == "tiny" else llm_default.engine.model
    shared = tokens(3 * B + 7, 3)
    first, second = shared + tokens(20, 4), shared + tokens(30, 5)
    pool = model.new_pool(rows=256)

    one = KVCache(pool, 256)
    for start in range(0, len(first), 40):  # in chunks, as the scheduler reads a prompt
        chunk = first[start : start + 40]
        model.forward(torch.tensor(chunk), torch.arange(start, start + len(chunk)), one)
        one.commit(len(chunk))
        one.publish(first)
    one.release()

    two = KVCache(pool, 256)
    assert two.adopt(second, len(second) - 1) == 3 * B
    rest = second[3 * B :]
    logits = model.forward(torch.tensor(rest), torch.arange(3 * B, len(second)), two, last_logits_only=True)
    two.commit(len(rest))

    fresh = model.new_cache(256)
    expected = model.forward(torch.tensor(second), torch.arange(len(second)), fresh, last_logits_only=True)
    fresh.commit(len(second))
    assert torch.equal(logits, expected)
    for layer in range(model.config.num_layers):
        assert torch.equal(pool.k[layer, two.blocks[:3]], fresh.pool.k[layer, fresh.blocks[:3]])
        assert torch.equal(pool.v[layer, two.blocks[:3]], fresh.pool.v[layer, fresh.blocks[:3]])
        assert torch.equal(two.keys(layer, len(second)), fresh.keys(layer, len(second)))
        assert torch.equal(two.values(layer, len(second)), fresh.values(layer, len(second)))


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_request_sharing_a_prefix_reuses_its_blocks_and_decodes_the_same(tiny_engine, params):
    first = tokens(100, 6)
    second = first[:96] + tokens(20, 7)  # three full blocks in common, then a different fourth
    cached, scheduler = one_after_another(tiny_engine, [first, second], params, True, method_for(params))
    plain, off = one_after_another(tiny_engine, [first, second], params, False, method_for(params))
    assert cached == plain
    assert scheduler.prefix_cache_queries == 100 + 116 and scheduler.prefix_cache_hits == 96
    assert off.prefix_cache_queries == off.prefix_cache_hits == 0
    assert scheduler.running == [] and scheduler.pool.used_blocks == 0 and scheduler.pool.cached_blocks > 0


def test_logprobs_and_penalties_are_the_same_with_the_cache(tiny_engine):
    """Penalties count the prompt's tokens, not its rows; logprobs come from bitwise equal logits."""
    first = tokens(100, 6)
    second = first[:96] + tokens(20, 7)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=0.8, seed=3, repetition_penalty=1.3,
                            presence_penalty=0.5, logprobs=3)

    def run(prefix_cache):
        scheduler = Scheduler(tiny_engine, prefix_cache=prefix_cache)
        results = []
        for prompt in (first, second):
            request = scheduler.submit(prompt, params, make_drafter("ar"))
            scheduler.run()
            results.append([token.to_dict() for token in request.result.tokens])
        return results, scheduler.prefix_cache_hits

    (cached, hits), (plain, _) = run(True), run(False)
    assert cached == plain and hits == 96


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_n_identical_prompts_read_it_once(tiny_engine, params, monkeypatch):
    """Submitted together, the 2nd and 3rd copies wait for the first to read the prompt (the
    scheduler reads the one with the fewest tokens left), then adopt its blocks."""
    prompt = tokens(150, 8)
    seeds = [params.seed, 11, 12] if params.seed is not None else [None] * 3

    def run(prefix_cache):
        scheduler = Scheduler(tiny_engine, max_batch=4, step_tokens=B, prefix_cache=prefix_cache,
                              kv_budget_bytes=64 * tiny_engine.model.new_pool().bytes_per_block)  # as the server's
        requests = [scheduler.submit(prompt, SamplingParams(**{**vars(params), "seed": s}), make_drafter(method_for(params)))
                    for s in seeds]
        scheduler.run()
        return [r.result.token_ids for r in requests], scheduler

    rows = prefill_rows(tiny_engine, monkeypatch)
    cached, scheduler = run(True)
    cached_rows, rows[0] = rows[0], 0
    plain, _ = run(False)
    assert cached == plain
    assert scheduler.prefix_cache_hits == 2 * 4 * B  # (150 - 1) // 32 blocks each, for two copies
    assert cached_rows == 150 + 2 * (150 - 4 * B) and rows[0] == 3 * 150
    no_leaks(scheduler.pool)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_preempted_requests_resume_from_their_cached_blocks_and_decode_the_same(tiny_engine, params):
    prompts = [tokens(70 + 9 * i, 20 + i) for i in range(4)]
    params = SamplingParams(**{**vars(params), "max_new_tokens": 40})
    blocks = -(-(max(map(len, prompts)) + 40 + 1) // B) + 2  # the largest alone, and little more
    budget = blocks * tiny_engine.model.new_pool().bytes_per_block

    def run(prefix_cache):
        scheduler = Scheduler(tiny_engine, max_batch=4, kv_budget_bytes=budget, prefix_cache=prefix_cache)
        requests = [scheduler.submit(p, params, make_drafter(method_for(params))) for p in prompts]
        while not scheduler.idle:
            scheduler.step()
            held = {block for r in scheduler.running for block in r.sequence.cache.blocks}
            assert scheduler.pool.used_blocks == len(held)  # shared blocks count once, cached idle ones not at all
        return [r.result.token_ids for r in requests], scheduler

    alone = [tiny_engine.generate(p, params, make_drafter(method_for(params))).token_ids for p in prompts]
    cached, scheduler = run(True)
    plain, off = run(False)
    assert cached == plain == alone
    assert scheduler.preemptions > 0 and off.preemptions > 0
    assert scheduler.prefix_cache_hits > 0  # the resumed ones found their own blocks again
    no_leaks(scheduler.pool)


def test_a_small_budget_evicts_the_least_recently_used_blocks_and_decodes_the_same(tiny_engine):
    """Six blocks; each request holds three (70 prompt + 20 new tokens) and leaves two full ones
    cached. The third request needs one cached block: the oldest request's last one goes."""
    a, b, c = tokens(70, 30), tokens(70, 31), tokens(70, 32)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    budget = 6 * tiny_engine.model.new_pool().bytes_per_block
    cached, scheduler = one_after_another(tiny_engine, [a, b, c], params, True, "ar", kv_budget_bytes=budget)
    pool = scheduler.pool
    found = lambda prompt: len(pool.prefix.match(chain_keys(prompt, B)))  # noqa: E731
    assert (found(a), found(b), found(c)) == (1, 2, 2)
    assert pool.cached_blocks == 5 and len(pool.free) == 1
    no_leaks(pool)

    hits = scheduler.prefix_cache_hits
    request = scheduler.submit(a, params, make_drafter("ar"))  # a again: its first block only
    scheduler.run()
    assert scheduler.prefix_cache_hits - hits == B
    plain, _ = one_after_another(tiny_engine, [a, b, c, a], params, False, "ar", kv_budget_bytes=budget)
    assert cached + [request.result.token_ids] == plain
    no_leaks(pool)


def test_a_growing_pool_evicts_before_it_grows(tiny_engine):
    prompts = [tokens(90, 40 + i) for i in range(5)]
    cached, scheduler = one_after_another(tiny_engine, prompts, GREEDY, True)
    plain, off = one_after_another(tiny_engine, prompts, GREEDY, False)
    assert cached == plain
    assert scheduler.pool.num_blocks == off.pool.num_blocks and scheduler.pool.cached_blocks > 0
    no_leaks(scheduler.pool)


def test_a_published_block_is_never_written_again(tiny_engine):
    """Draft rows are written beyond a sequence's committed rows and accepted ones copied down
    (KVCache.keep); prompt chunks are written beyond adopted blocks: none of it lands in a block
    while it is published, shared or not."""
    pattern = tokens(20, 60)
    prompts = [pattern * 5, pattern * 5 + tokens(10, 61), pattern * 4 + tokens(3, 62)]
    scheduler = Scheduler(tiny_engine, max_batch=3, step_tokens=B)
    requests = [scheduler.submit(p, SamplingParams(max_new_tokens=60, ignore_eos=True), make_drafter("ngram"))
                for p in prompts]
    seen = {}
    while not scheduler.idle:
        scheduler.step()
        pool = scheduler.pool
        for block, key in pool.prefix.key_of.items():
            rows = seen.setdefault((block, key), (pool.k[:, block].clone(), pool.v[:, block].clone()))
            assert torch.equal(rows[0], pool.k[:, block]) and torch.equal(rows[1], pool.v[:, block])
    assert len(seen) > 5 and scheduler.prefix_cache_hits == 2 * B + 3 * B  # the third read first (the shortest)
    assert all(r.result.stats.draft_tokens > 0 for r in requests)
    no_leaks(scheduler.pool)


class Capturing(Autoregressive):
    """Plain decoding, with a drafter's wish for hidden states: it must see every prompt row."""

    hidden_layers = (1,)

    def begin(self, prompt_ids):
        self.rows = []

    def prefilled(self, start, hidden):
        self.rows += range(start, start + len(hidden))


def test_a_drafter_that_reads_hidden_states_gets_every_prompt_row(tiny_engine):
    """Such a sequence never adopts blocks (its drafter needs every prompt row's states), but it
    publishes its own for others."""
    prompt = tokens(100, 50)
    scheduler = Scheduler(tiny_engine)
    drafters = [Capturing(), Capturing()]
    first = scheduler.submit(prompt, GREEDY, drafters[0])
    scheduler.run()
    second = scheduler.submit(prompt + [1, 2, 3], GREEDY, make_drafter("ar"))
    scheduler.run()
    assert second.sequence.stats.cached_prompt_tokens == 3 * B  # the first one's blocks
    third = scheduler.submit(prompt, GREEDY, drafters[1])
    scheduler.run()
    assert drafters[0].rows == drafters[1].rows == list(range(100)) and third.sequence.stats.cached_prompt_tokens == 0
    assert third.result.token_ids == first.result.token_ids
    assert scheduler.prefix_cache_hits == 3 * B and scheduler.prefix_cache_queries == 103  # only the second looked


# The real default model.


def chat(system: str, question: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


SYSTEM = "You are a careful assistant. Answer in plain words, without lists.\n\n" + LIGHTHOUSE * 3


@pytest.mark.slow
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_real_requests_sharing_a_system_prompt_decode_the_same(llm_default, params):
    llm = llm_default
    prompts = [llm.prompt_ids(chat(SYSTEM, q)) for q in (EXERCISE, SEASONS)]
    shared = next(i for i, (x, y) in enumerate(zip(*prompts)) if x != y)
    assert shared > 4 * B
    cached, scheduler = one_after_another(llm.engine, prompts, params, True, "suffix" if params.greedy else "ar")
    plain, _ = one_after_another(llm.engine, prompts, params, False, "suffix" if params.greedy else "ar")
    assert cached == plain
    assert scheduler.prefix_cache_hits == shared // B * B


@pytest.mark.slow
def test_real_chat_second_turn_reuses_the_first_turn_and_its_answer(llm_default):
    llm = llm_default
    params = SamplingParams(max_new_tokens=48)
    turn1 = llm.prompt_ids(chat(SYSTEM, EXERCISE))

    def run(prefix_cache):
        scheduler = Scheduler(llm.engine, prefix_cache=prefix_cache)
        first = scheduler.submit(turn1, params, make_drafter("ngram"))
        scheduler.run()
        messages = chat(SYSTEM, EXERCISE) + [{"role": "assistant", "content": first.result.text},
                                             {"role": "user", "content": "Now say it in one sentence."}]
        turn2 = llm.prompt_ids(messages)
        hits = scheduler.prefix_cache_hits
        second = scheduler.submit(turn2, params, make_drafter("ngram"))
        scheduler.run()
        return first.result, second.result, turn2, scheduler.prefix_cache_hits - hits

    first, second, turn2, hits = run(True)
    first_off, second_off, _, _ = run(False)
    assert first.token_ids == first_off.token_ids and second.token_ids == second_off.token_ids
    # The answer reads back as generated up to some token (BPE need not give a model's tokens back).
    read_back = turn1 + first.token_ids
    common = next(i for i, (x, y) in enumerate(zip(turn2, read_back)) if x != y)
    assert common >= (len(turn1) // B + 1) * B  # past the block the prompt ended in, which decode steps filled
    if llm.engine.model.prompt_rows_differ:  # FASTDECODE_AMX=prompts: an answer's rows are not shared
        assert hits == len(turn1) // B * B
    else:
        assert hits == common // B * B  # every block up to there: the prompt's and the answer's


@pytest.mark.slow
def test_real_n_identical_prompts_sampled_decode_the_same(llm_default):
    llm = llm_default
    prompt = llm.prompt_ids(chat(SYSTEM, SEASONS))

    def run(prefix_cache):
        scheduler = Scheduler(llm.engine, max_batch=4, prefix_cache=prefix_cache)
        requests = [scheduler.submit(prompt, SamplingParams(max_new_tokens=16, temperature=0.8, seed=s),
                                     make_drafter("ar")) for s in (1, 2, 3)]
        scheduler.run()
        return [r.result.token_ids for r in requests], scheduler

    cached, scheduler = run(True)
    plain, _ = run(False)
    assert cached == plain and len(set(map(tuple, cached))) > 1  # different samples, each exact
    assert scheduler.prefix_cache_hits == 2 * ((len(prompt) - 1) // B * B)
