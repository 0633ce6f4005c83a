"""Figures from raw benchmark records: pure functions, no model, no clock.

A record (one line of results.jsonl) is one answer: one question's turn, by one method or peer, in
one repeat. Its keys: question_id, category, group, turn, repeat, method, reference (the method
whose greedy output it must reproduce, or None), prompt_tokens, new_tokens (generated token ids,
EOS included: the one counter for every contender), time_s, token_ids, and for fastdecode's methods
the engine's statistics: forward_passes, drafts, draft_tokens, accepted_tokens,
accepted_per_position, accepted_lengths (None for peers, which do not report them).

Definitions (vLLM's, and Spec-Bench's "mean accepted tokens"):
  tokens/s              total new tokens / total time, per repeat; mean and standard deviation over repeats
  speedup               that rate over `ar`'s on the same answers of the same repeat
  mean per-answer ratio the mean over answers of (answer's tokens/s) / (`ar`'s tokens/s on that answer)
  mean acceptance len.  1 + accepted / drafts (a draft is one non-empty proposal; the bonus token counts)
  acceptance rate       accepted / drafted tokens
  per-position rate     [k]: share of drafts whose token at depth k+1 was accepted
"""
from __future__ import annotations

import math
from collections import Counter

BASELINE = "ar"


def first_difference(ids: list[int], reference: list[int]) -> int | None:
    """First position where two token sequences differ (the shorter length when one is a prefix of
    the other), None when they are equal."""
    pos = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), None)
    if pos is None and len(ids) != len(reference):
        pos = min(len(ids), len(reference))
    return pos


def answer_key(r: dict) -> tuple:
    """Which answer a record is, whoever gave it."""
    return (r["question_id"], r["turn"], r["repeat"])


def complete_records(records: list[dict], methods: list[str]) -> list[dict]:
    """The records of the answers every method gave (an interrupted run leaves some half done)."""
    given: dict[tuple, set] = {}
    for r in records:
        given.setdefault(answer_key(r), set()).add(r["method"])
    return [r for r in records if set(methods) <= given[answer_key(r)]]


def mean_std(values: list[float]) -> dict:
    """{"mean", "std"}: the sample standard deviation, None below two values; both None for none."""
    if not values:
        return {"mean": None, "std": None}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std}


def _rate(tokens: float, seconds: float) -> float | None:
    return tokens / seconds if seconds > 0 else None


def speed_figures(runs: list[dict], baseline: list[dict]) -> dict:
    """tokens/s, speedup and mean per-answer ratio over the same answers, per repeat then mean/std."""
    base_by_key = {answer_key(r): r for r in baseline}
    rates, speedups, ratios = [], [], []
    for rep in sorted({r["repeat"] for r in runs}):
        mine = [r for r in runs if r["repeat"] == rep]
        theirs = [base_by_key[answer_key(r)] for r in mine if answer_key(r) in base_by_key]
        rate = _rate(sum(r["new_tokens"] for r in mine), sum(r["time_s"] for r in mine))
        base = _rate(sum(r["new_tokens"] for r in theirs), sum(r["time_s"] for r in theirs))
        if rate is not None:
            rates.append(rate)
        if rate is not None and base:
            speedups.append(rate / base)
        per_answer = []
        for r in mine:
            b = base_by_key.get(answer_key(r))
            a_rate, b_rate = _rate(r["new_tokens"], r["time_s"]), b and _rate(b["new_tokens"], b["time_s"])
            if a_rate is not None and b_rate:
                per_answer.append(a_rate / b_rate)
        if per_answer:
            ratios.append(sum(per_answer) / len(per_answer))
    return {"tokens_per_s": mean_std(rates), "speedup": mean_std(speedups), "mean_speedup": mean_std(ratios)}


def acceptance_figures(runs: list[dict]) -> dict:
    """Drafting figures summed over the runs; None for a contender that does not report them."""
    if not runs or any(r.get("drafts") is None for r in runs):
        return {"drafts": None, "draft_tokens": None, "accepted_tokens": None, "mean_acceptance_length": None,
                "acceptance_rate": None, "acceptance_per_position": [], "accepted_length_histogram": {}}
    drafts = sum(r["drafts"] for r in runs)
    drafted = sum(r["draft_tokens"] for r in runs)
    accepted = sum(r["accepted_tokens"] for r in runs)
    depth = max((len(r["accepted_per_position"]) for r in runs), default=0)
    per_position = [sum(r["accepted_per_position"][k] for r in runs if k < len(r["accepted_per_position"])) / drafts
                    for k in range(depth)] if drafts else []
    histogram = Counter(n for r in runs for n in r["accepted_lengths"])
    return {"drafts": drafts, "draft_tokens": drafted, "accepted_tokens": accepted,
            "mean_acceptance_length": 1.0 + accepted / drafts if drafts else 1.0,
            "acceptance_rate": accepted / drafted if drafted else None,
            "acceptance_per_position": per_position,
            "accepted_length_histogram": {str(n): histogram[n] for n in sorted(histogram)}}


def exactness(runs: list[dict], all_records: list[dict], greedy: bool) -> dict:
    """How many answers differ from the reference's same answer, and where each first differs.
    None when there is nothing to compare: no reference, or sampling (outputs legitimately differ)."""
    reference = runs[0]["reference"] if runs else None
    if reference is None or not greedy:
        return {"reference": reference, "differing_answers": None, "first_differences": []}
    ref_ids = {answer_key(r): r["token_ids"] for r in all_records if r["method"] == reference}
    firsts = []
    for r in runs:
        if answer_key(r) in ref_ids:
            pos = first_difference(r["token_ids"], ref_ids[answer_key(r)])
            if pos is not None:
                firsts.append({"question_id": r["question_id"], "turn": r["turn"], "repeat": r["repeat"], "position": pos})
    return {"reference": reference, "differing_answers": len(firsts), "first_differences": firsts}


def method_figures(runs: list[dict], scope_records: list[dict], greedy: bool) -> dict:
    """Every figure of one method over one scope (a task group, or all)."""
    baseline = [r for r in scope_records if r["method"] == BASELINE]
    return {
        "questions": len({r["question_id"] for r in runs}),
        "answers": len(runs),
        "tokens": sum(r["new_tokens"] for r in runs),
        "time_s": sum(r["time_s"] for r in runs),
        **speed_figures(runs, baseline),
        **acceptance_figures(runs),
        **exactness(runs, scope_records, greedy),
    }


def summarize(records: list[dict], methods: list[str], groups: list[str], greedy: bool) -> dict:
    """{scope: {method: figures}}: one scope per task group present (in `groups` order), then "overall",
    over the answers every method gave."""
    records = complete_records(records, methods)
    scopes = {g: [r for r in records if r["group"] == g] for g in groups}
    scopes = {g: rs for g, rs in scopes.items() if rs}
    scopes["overall"] = records
    return {scope: {m: method_figures([r for r in rs if r["method"] == m], rs, greedy) for m in methods}
            for scope, rs in scopes.items()}


def differing_methods(overall: dict[str, dict]) -> dict[str, int]:
    """Methods with any greedy answer unlike their reference's -> how many."""
    return {m: f["differing_answers"] for m, f in overall.items() if f["differing_answers"]}
