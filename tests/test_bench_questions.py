"""Question files: the schema, errors with line numbers, task groups, the seeded sample, Spec-Bench lookup."""
import json

import pytest

from fastdecode.bench import questions as qs


def write(tmp_path, lines, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")
    return path


def q(qid, category, *turns):
    return {"question_id": qid, "category": category, "turns": list(turns) or ["ask"]}


def test_builtin_set_covers_every_task_group_with_multi_turn_questions():
    questions = qs.load_questions(qs.questions_path(None))
    assert {x.group for x in questions} == set(qs.GROUPS)
    assert any(len(x.turns) > 1 for x in questions)


def test_categories_map_to_spec_bench_task_groups(tmp_path):
    loaded = qs.load_questions(write(tmp_path, [q(1, "writing"), q(2, "coding"), q("t", "translation"), q(4, "rag")]))
    assert [x.group for x in loaded] == ["mt_bench", "mt_bench", "translation", "rag"]
    assert loaded[2].question_id == "t"


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (json.dumps({"question_id": 2, "turns": ["x"]}), "line 2: missing category"),
    (json.dumps(q(2, "poetry")), "line 2: unknown category 'poetry'"),
    (json.dumps({"question_id": 2, "category": "qa", "turns": []}), "line 2: turns must be a non-empty list"),
    (json.dumps({"question_id": 2, "category": "qa", "turns": "ask"}), "line 2: turns must be a non-empty list"),
    (json.dumps({"question_id": True, "category": "qa", "turns": ["x"]}), "line 2: question_id must be"),
    (json.dumps(q(1, "qa")), "line 2: duplicate question_id 1"),
])
def test_malformed_files_name_the_line(tmp_path, line, message):
    path = write(tmp_path, [q(1, "qa"), line])
    with pytest.raises(qs.QuestionError, match=message.replace("[", r"\[")) as err:
        qs.load_questions(path)
    assert str(path) in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(qs.QuestionError, match="not found"):
        qs.load_questions(tmp_path / "nope.jsonl")
    with pytest.raises(qs.QuestionError, match="holds no questions"):
        qs.load_questions(write(tmp_path, ["", "  "]))


def test_per_group_sample_is_seeded_fixed_and_independent_of_other_groups(tmp_path):
    lines = [q(i, "qa") for i in range(20)] + [q(100 + i, "rag") for i in range(5)]
    both = qs.load_questions(write(tmp_path, lines, "both.jsonl"))
    qa_only = qs.load_questions(write(tmp_path, lines[:20], "qa.jsonl"))
    a, b = qs.sample_questions(both, 3, seed=0), qs.sample_questions(both, 3, seed=0)
    assert a == b and len(a) == 6
    assert [x.question_id for x in a if x.group == "qa"] == [x.question_id for x in qs.sample_questions(qa_only, 3)]
    ids = [x.question_id for x in a if x.group == "qa"]
    assert ids == sorted(ids)  # file order kept
    assert qs.sample_questions(both, 3, seed=1) != a
    assert qs.sample_questions(both, 0) == both and len(qs.sample_questions(both, 10)) == 15  # a group holding fewer gives all


def test_groups_come_in_spec_bench_order(tmp_path):
    loaded = qs.load_questions(write(tmp_path, [q(1, "rag"), q(2, "writing"), q(3, "qa")]))
    assert [x.group for x in qs.sample_questions(loaded, 0)] == ["mt_bench", "qa", "rag"]


def test_spec_bench_lookup_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv(qs.SPEC_BENCH_ENV, str(tmp_path / "missing.jsonl"))
    monkeypatch.setattr(qs, "spec_bench_candidates", lambda: [(tmp_path / "missing.jsonl", "$FASTDECODE_SPEC_BENCH"),
                                                               (tmp_path / "shared" / "question.jsonl", "beside the repository")])
    with pytest.raises(qs.QuestionError) as err:
        qs.questions_path("spec-bench")
    assert "missing.jsonl" in str(err.value) and "beside the repository" in str(err.value)
    assert "FASTDECODE_SPEC_BENCH" in str(err.value)


def test_spec_bench_environment_variable_comes_first(tmp_path, monkeypatch):
    path = write(tmp_path, [q(1, "qa")])
    monkeypatch.setenv(qs.SPEC_BENCH_ENV, str(path))
    assert qs.questions_path("spec-bench") == path
    assert qs.questions_path(str(path)) == path
