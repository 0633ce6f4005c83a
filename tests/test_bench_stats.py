"""The benchmark's figures on hand-made records, against answers worked out by hand."""
import math

import pytest

from fastdecode.bench.stats import complete_records, first_difference, mean_std, summarize


def rec(method, qid, tokens, time_s, *, group="qa", turn=0, repeat=0, ids=None, reference="ar",
        drafts=0, draft_tokens=0, accepted=0, per_position=(), lengths=()):
    peer = method.startswith("hf")
    return {"question_id": qid, "category": group, "group": group, "turn": turn, "repeat": repeat, "method": method,
            "reference": None if method in ("ar", "hf") else reference, "prompt_tokens": 10, "new_tokens": tokens,
            "time_s": time_s, "token_ids": list(ids if ids is not None else range(tokens)),
            "drafts": None if peer else drafts, "draft_tokens": None if peer else draft_tokens,
            "accepted_tokens": None if peer else accepted,
            "accepted_per_position": None if peer else list(per_position),
            "accepted_lengths": None if peer else list(lengths)}


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 9, 3], [1, 2, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # a prefix differs where it stops
    assert first_difference([], []) is None


def test_mean_std():
    assert mean_std([]) == {"mean": None, "std": None}
    assert mean_std([2.0]) == {"mean": 2.0, "std": None}
    out = mean_std([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and math.isclose(out["std"], 1.0)  # sample standard deviation


def test_speedup_is_a_ratio_of_totals_and_the_mean_ratio_is_per_answer():
    # ar: q1 100 tok in 2 s (50/s), q2 100 tok in 1 s (100/s) -> 200/3 tok/s.
    # ngram: q1 100 tok in 1 s (100/s, 2x), q2 100 tok in 1 s (100/s, 1x) -> 100 tok/s.
    records = [rec("ar", 1, 100, 2.0), rec("ar", 2, 100, 1.0),
               rec("ngram", 1, 100, 1.0, drafts=10, draft_tokens=40, accepted=20, per_position=[8, 7, 5], lengths=[3] * 10),
               rec("ngram", 2, 100, 1.0, drafts=10, draft_tokens=40, accepted=10, per_position=[6, 4], lengths=[2] * 10)]
    f = summarize(records, ["ar", "ngram"], ["qa"], greedy=True)["overall"]["ngram"]
    assert math.isclose(f["tokens_per_s"]["mean"], 100.0)
    assert math.isclose(f["speedup"]["mean"], 100.0 / (200 / 3))  # 1.5x, not the mean of ratios
    assert math.isclose(f["mean_speedup"]["mean"], 1.5)  # (2 + 1) / 2: here the two agree by construction...
    records[1] = rec("ar", 2, 100, 0.5)  # ...until q2's ar answer is faster: 400/2.5 = 80 tok/s overall
    f = summarize(records, ["ar", "ngram"], ["qa"], greedy=True)["overall"]["ngram"]
    assert math.isclose(f["speedup"]["mean"], 100.0 / 80.0)
    assert math.isclose(f["mean_speedup"]["mean"], (2.0 + 0.5) / 2)
    assert f["drafts"] == 20 and f["draft_tokens"] == 80 and f["accepted_tokens"] == 30
    assert math.isclose(f["mean_acceptance_length"], 1 + 30 / 20)
    assert math.isclose(f["acceptance_rate"], 30 / 80)
    assert f["acceptance_per_position"] == [14 / 20, 11 / 20, 5 / 20]
    assert f["accepted_length_histogram"] == {"2": 10, "3": 10}
    ar = summarize(records, ["ar", "ngram"], ["qa"], greedy=True)["overall"]["ar"]
    assert ar["speedup"]["mean"] == 1.0 and ar["mean_acceptance_length"] == 1.0 and ar["acceptance_rate"] is None


def test_repeats_give_mean_and_std_of_per_repeat_figures():
    records = [rec("ar", 1, 100, 1.0, repeat=0), rec("ngram", 1, 100, 0.5, repeat=0),  # 2x
               rec("ar", 1, 100, 1.0, repeat=1), rec("ngram", 1, 100, 0.25, repeat=1)]  # 4x
    f = summarize(records, ["ar", "ngram"], ["qa"], greedy=True)["overall"]["ngram"]
    assert f["speedup"]["mean"] == 3.0 and math.isclose(f["speedup"]["std"], math.sqrt(2))
    assert f["tokens_per_s"] == {"mean": 300.0, "std": pytest.approx(math.sqrt(2) * 100)}


def test_groups_and_overall_scopes():
    records = [rec("ar", 1, 10, 1.0, group="qa"), rec("ngram", 1, 10, 0.5, group="qa"),
               rec("ar", 2, 10, 1.0, group="rag"), rec("ngram", 2, 10, 1.0, group="rag")]
    s = summarize(records, ["ar", "ngram"], ["mt_bench", "qa", "rag"], greedy=True)
    assert list(s) == ["qa", "rag", "overall"]  # absent groups left out, overall last
    assert s["qa"]["ngram"]["speedup"]["mean"] == 2.0 and s["rag"]["ngram"]["speedup"]["mean"] == 1.0
    assert math.isclose(s["overall"]["ngram"]["speedup"]["mean"], 20 / 1.5 / 10)
    assert s["overall"]["ngram"]["questions"] == 2


def test_a_perturbed_method_is_caught_with_its_first_differing_position():
    good = list(range(50))
    bad = good[:17] + [999] + good[18:]
    records = [rec("ar", 1, 50, 1.0, ids=good), rec("ngram", 1, 50, 0.5, ids=good), rec("suffix", 1, 50, 0.5, ids=bad),
               rec("ar", 2, 50, 1.0, ids=good, turn=1), rec("ngram", 2, 50, 0.5, ids=good, turn=1),
               rec("suffix", 2, 50, 0.5, ids=good, turn=1)]
    s = summarize(records, ["ar", "ngram", "suffix"], ["qa"], greedy=True)["overall"]
    assert s["ngram"]["differing_answers"] == 0
    assert s["suffix"]["differing_answers"] == 1
    assert s["suffix"]["first_differences"] == [{"question_id": 1, "turn": 0, "repeat": 0, "position": 17}]
    assert s["ar"]["differing_answers"] is None  # the baseline has no reference


def test_exactness_is_not_judged_under_sampling():
    records = [rec("ar", 1, 5, 1.0, ids=[1, 2, 3, 4, 5]), rec("ngram", 1, 5, 1.0, ids=[1, 2, 9, 4, 5])]
    f = summarize(records, ["ar", "ngram"], ["qa"], greedy=False)["overall"]["ngram"]
    assert f["differing_answers"] is None


def test_peers_have_no_acceptance_figures_and_compare_with_their_own_reference():
    records = [rec("ar", 1, 10, 1.0), rec("hf", 1, 10, 2.0, ids=[7] * 10),
               rec("hf-lookup", 1, 10, 1.0, ids=[7] * 10, reference="hf")]
    s = summarize(records, ["ar", "hf", "hf-lookup"], ["qa"], greedy=True)["overall"]
    assert s["hf"]["speedup"]["mean"] == 0.5 and s["hf"]["mean_acceptance_length"] is None
    assert s["hf"]["differing_answers"] is None  # hf is its own baseline: different numerics from ar
    assert s["hf-lookup"]["differing_answers"] == 0 and s["hf-lookup"]["speedup"]["mean"] == 1.0
    assert s["hf-lookup"]["accepted_length_histogram"] == {} and s["hf-lookup"]["acceptance_per_position"] == []


def test_only_answers_every_method_gave_are_counted():
    records = [rec("ar", 1, 10, 1.0), rec("ngram", 1, 10, 0.5), rec("ar", 2, 10, 1.0)]  # interrupted before ngram on q2
    kept = complete_records(records, ["ar", "ngram"])
    assert [(r["method"], r["question_id"]) for r in kept] == [("ar", 1), ("ngram", 1)]
    assert summarize(records, ["ar", "ngram"], ["qa"], greedy=True)["overall"]["ar"]["answers"] == 1
