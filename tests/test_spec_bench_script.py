"""benchmarks/spec_bench.py: question loading, task groups, seeded sampling, statistics (no model)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "spec_bench.py"


@pytest.fixture(scope="module")
def sb():
    spec = importlib.util.spec_from_file_location("spec_bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


MT = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
OTHERS = ["translation", "summarization", "qa", "math_reasoning", "rag"]


def write_questions(path: Path, per_category: int = 4) -> Path:
    """Questions of every category, interleaved, ids 1..n in file order."""
    lines, qid = [], 0
    for k in range(per_category):
        for category in MT + OTHERS:
            qid += 1
            turns = [f"{category} question {k}"] + (["a second turn"] if category in MT else [])
            lines.append(json.dumps({"question_id": qid, "category": category, "turns": turns}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_categories_map_to_spec_bench_task_groups(sb, tmp_path):
    questions = sb.load_questions(write_questions(tmp_path / "q.jsonl"))
    assert len(questions) == 4 * 13
    for q in questions:
        assert q.group == ("mt_bench" if q.category in MT else q.category)
    groups = sb.group_questions(questions)
    assert list(groups) == ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    assert len(groups["mt_bench"]) == 32 and all(len(groups[g]) == 4 for g in OTHERS)
    for qs in groups.values():  # file order kept
        assert [q.question_id for q in qs] == sorted(q.question_id for q in qs)
    assert questions[0].turns[0] == "writing question 0"


def test_seeded_sample_is_deterministic_and_takes_n_per_group(sb, tmp_path):
    groups = sb.group_questions(sb.load_questions(write_questions(tmp_path / "q.jsonl", per_category=6)))
    ids = lambda s: {g: [q.question_id for q in qs] for g, qs in s.items()}  # noqa: E731
    a = sb.sample_questions(groups, 3, seed=0)
    assert ids(a) == ids(sb.sample_questions(groups, 3, seed=0))
    assert list(a) == list(groups) and all(len(qs) == 3 for qs in a.values())
    for g, qs in a.items():
        assert set(qs) <= set(groups[g])
        assert [q.question_id for q in qs] == sorted(q.question_id for q in qs)
    assert ids(a) != ids(sb.sample_questions(groups, 3, seed=1))
    # a group's sample does not depend on the other groups present
    only_qa = sb.sample_questions({"qa": groups["qa"]}, 3, seed=0)
    assert ids(only_qa)["qa"] == ids(a)["qa"]
    # 0, or more than a group holds: all of it
    assert ids(sb.sample_questions(groups, 0)) == ids(groups)
    assert ids(sb.sample_questions(groups, 7))["qa"] == ids(groups)["qa"]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ('{"question_id": 99, "category": "qa"}', "missing turns"),
    ('{"question_id": 99, "category": "poetry", "turns": ["x"]}', "unknown category 'poetry'"),
    ('{"question_id": 99, "category": "qa", "turns": []}', "turns must be"),
    ('{"question_id": 1, "category": "qa", "turns": ["x"]}', "duplicate question_id 1"),
    ('[1, 2]', "expected a JSON object"),
])
def test_malformed_line_names_its_line_number(sb, tmp_path, bad, message):
    path = tmp_path / "q.jsonl"
    good = [json.dumps({"question_id": i, "category": "qa", "turns": ["q"]}) for i in (1, 2)]
    path.write_text("\n".join([good[0], "", good[1], bad]) + "\n")  # blank line 2 is skipped
    with pytest.raises(sb.QuestionError) as err:
        sb.load_questions(path)
    assert f"{path}, line 4: " in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_default_location(sb, tmp_path, monkeypatch):
    with pytest.raises(sb.QuestionError, match="not found at .*nowhere.jsonl"):
        sb.load_questions(tmp_path / "nowhere.jsonl")
    monkeypatch.delenv(sb.ENV_VAR, raising=False)
    path, _ = sb.default_questions_path()
    assert path == SCRIPT.parent.parent.parent / "shared" / "data" / "spec_bench" / "question.jsonl"
    monkeypatch.setenv(sb.ENV_VAR, str(tmp_path / "mine.jsonl"))
    assert sb.default_questions_path()[0] == tmp_path / "mine.jsonl"


def test_statistics(sb):
    assert sb.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert sb.first_difference([1, 5, 3], [1, 2, 3]) == 1
    assert sb.first_difference([1, 2], [1, 2, 3]) == 2
    rec = lambda q, g, m, n, t, d=0, dt=0, acc=0, diff=None: dict(  # noqa: E731
        question_id=q, group=g, method=m, num_tokens=n, time_s=t, drafts=d, draft_tokens=dt,
        accepted_tokens=acc, first_diff=diff)
    records = [rec(1, "qa", "ar", 10, 2.0), rec(1, "qa", "ngram", 10, 1.0, d=4, dt=8, acc=6),
               rec(2, "rag", "ar", 20, 2.0), rec(2, "rag", "ngram", 20, 4.0, d=2, dt=4, acc=0, diff=3),
               rec(3, "rag", "ar", 5, 1.0)]  # question 3 incomplete: left out
    s = sb.summarize(records, ["ar", "ngram"])
    assert list(s) == ["qa", "rag", "overall"]
    o = s["overall"]["ngram"]
    assert o["questions"] == 2 and o["tokens"] == 30 and o["time_s"] == 5.0
    assert o["speedup"] == pytest.approx((30 / 5) / (30 / 4))
    assert o["mean_speedup"] == pytest.approx((2.0 + 0.5) / 2)
    assert o["mean_acceptance_length"] == pytest.approx(1 + 6 / 6)
    assert o["acceptance_rate"] == pytest.approx(6 / 12)
    assert o["differing_answers"] == 1 and s["qa"]["ngram"]["differing_answers"] == 0
    assert s["overall"]["ar"]["mean_acceptance_length"] == 1.0 and s["overall"]["ar"]["acceptance_rate"] is None
    table = sb.summary_table(s, markdown=True)
    assert table.splitlines()[0] == "| method | qa | rag | overall |"
    assert "| `ngram` | 2.00x (2.50) | 0.50x (1.00) | 0.80x (2.00) |" in table
