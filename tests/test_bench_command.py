"""`fastdecode bench` as a user meets it: bad input, --compare, and end-to-end runs on the real model."""
import json

import pytest

from fastdecode.bench.report import write_summary
from fastdecode.bench.stats import summarize
from fastdecode.cli import main


def bench(*args):
    return main(["bench", *args])


@pytest.mark.parametrize("args, message", [
    (["--methods", "ar,warp"], "unknown method 'warp'; available methods: ar, ngram"),
    (["--methods", "draft"], "method 'draft' needs --draft-model"),
    (["--peers", "vllm"], "unknown peer 'vllm'; available peers: hf"),
    (["--per-group", "-1"], "--per-group takes 0 (all) or more"),
    (["--repeats", "0"], "--repeats takes 1 or more"),
    (["--max-new-tokens", "0"], "--max-new-tokens takes 1 or more"),
    (["--temperature", "-1"], "--temperature takes 0 or more"),
    (["--option", "max_ngram=5"], "--option takes METHOD.KEY=VALUE"),
    (["--methods", "ngram", "--option", "suffix.max_depth=5"], "which this run does not include"),
    (["--methods", "ngram", "--option", "ngram.window=5"], "method 'ngram' has no option 'window'; it belongs to method lookahead"),
    (["--methods", "ngram", "--option", "ngram.max_ngram=zero"], "ngram: max_ngram must be an integer"),
])
def test_bad_arguments_exit_2_with_one_line(args, message, capsys, tmp_path):
    assert bench(*args, "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_question_files_exit_2_naming_the_line(capsys, tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "qa", "turns": ["hi"]}\n{"question_id": 2,\n')
    assert bench("--questions", str(path), "--out", str(tmp_path / "out")) == 2
    assert f"{path}, line 2: not valid JSON" in capsys.readouterr().err
    assert bench("--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "out")) == 2
    assert "question file not found" in capsys.readouterr().err


def test_an_existing_output_folder_is_refused_without_overwrite(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    assert bench("--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- --compare

def result_folder(path, suffix_ids, seconds, draft_rate=0.5):
    """A hand-made result folder: ar and ngram on two questions; ngram's q2 ids end in `suffix_ids`."""
    records = []
    for qid in (1, 2):
        for method, t in (("ar", 1.0), ("ngram", seconds)):
            ids = [1, 2, 3] + (suffix_ids if method == "ngram" and qid == 2 else [4])
            records.append({"question_id": qid, "category": "qa", "group": "qa", "turn": 0, "repeat": 0,
                            "method": method, "reference": None if method == "ar" else "ar", "prompt_tokens": 5,
                            "new_tokens": len(ids), "time_s": t, "token_ids": ids, "drafts": 2 if method == "ngram" else 0,
                            "draft_tokens": 4 if method == "ngram" else 0, "accepted_tokens": int(4 * draft_rate) if method == "ngram" else 0,
                            "accepted_per_position": [], "accepted_lengths": []})
    path.mkdir()
    with open(path / "results.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = {"machine": {"date": "2026-11-23", "dtype": "bfloat16"},
               "setup": {"model": "m", "questions_file": "q", "max_new_tokens": 4, "temperature": 0.0},
               "scopes": summarize(records, ["ar", "ngram"], ["qa"], greedy=True)}
    write_summary(summary, path / "summary.json")
    return path


def test_compare_prints_changes_and_flags_an_exactness_regression(capsys, tmp_path):
    a = result_folder(tmp_path / "a", [4], 0.5)
    b = result_folder(tmp_path / "b", [5], 0.4)
    assert bench("--compare", str(a), str(a)) == 0
    same = capsys.readouterr().out
    assert "0 regression(s)" in same and "0/2" in same
    assert bench("--compare", str(a), str(b)) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ngram"))
    assert "0 -> 1 REGRESSION" in row and "1/2" in row  # one answer now differs from ar, one changed between runs
    assert "+25.0%" in row  # 8 tokens in 1.0 s -> in 0.8 s


def test_compare_refuses_a_folder_that_is_not_a_result(capsys, tmp_path):
    assert bench("--compare", str(tmp_path), str(tmp_path)) == 2
    assert "no summary.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real model, end to end

def two_questions(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"question_id": "w", "category": "writing",
                                "turns": ["Write two sentences about rain.", "Now make them rhyme."]}) + "\n"
                    + json.dumps({"question_id": "s", "category": "summarization",
                                  "turns": ["Summarize: the cat sat on the mat because the mat was warm."]}) + "\n")
    return path


@pytest.mark.slow
def test_end_to_end_on_the_real_model_writes_every_report(tmp_path, capsys):
    out = tmp_path / "out"
    status = bench("--questions", str(two_questions(tmp_path)), "--max-new-tokens", "16", "--methods", "ngram,suffix",
                   "--option", "ngram.max_ngram=3", "--peers", "all", "--out", str(out))
    assert status == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert {"results.jsonl", "summary.json", "report.md", "speedup.png", "acceptance_length.png",
            "acceptance_per_position.png", "cost_curve.png"} <= names
    summary = json.loads((out / "summary.json").read_text())
    ran = summary["methods"]
    assert summary["setup"]["method_options"] == {"ngram": {"max_ngram": 3}}
    assert ran[:3] == ["ar", "ngram", "suffix"]
    assert set(ran[3:]) | set(summary["skipped"]) == {"hf", "hf-lookup", "hf-assisted", "llamacpp", "llamacpp-lookup"}
    assert "--draft-model" in summary["skipped"]["hf-assisted"]  # listed with why, never dropped
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 * len(ran)  # 3 answers (one question has two turns) per contender
    assert all(0 < r["new_tokens"] <= 16 and r["new_tokens"] == len(r["token_ids"]) for r in records)
    overall = summary["scopes"]["overall"]
    assert list(summary["scopes"]) == ["mt_bench", "summarization", "overall"]
    assert overall["ngram"]["differing_answers"] == 0 and overall["suffix"]["differing_answers"] == 0
    assert overall["ar"]["speedup"]["mean"] == 1.0 and overall["ngram"]["answers"] == 3
    second_turns = [r for r in records if r["turn"] == 1]
    first_turn_ar = next(r for r in records if r["turn"] == 0 and r["method"] == "ar" and r["question_id"] == "w")
    assert all(r["prompt_tokens"] > first_turn_ar["prompt_tokens"] + first_turn_ar["new_tokens"] for r in second_turns)
    report = (out / "report.md").read_text()
    assert "| `ngram` |" in report and "hf-assisted: needs --draft-model" in report and "![speedup](speedup.png)" in report
    assert "Cost curve: 1 token" in report and "Cost curve: 1 token" in capsys.readouterr().out
    from fastdecode.kernels import kernel_description  # the products' path: answers differ between paths
    assert f", {kernel_description()}. Date:" in report

    # a second run into the same folder needs --overwrite; --compare of a folder with itself finds no regression
    assert bench("--questions", str(two_questions(tmp_path)), "--out", str(out)) == 2
    assert bench("--compare", str(out), str(out)) == 0


@pytest.mark.slow
def test_a_method_whose_output_changes_is_caught_and_marked_red(tmp_path, capsys, monkeypatch):
    from fastdecode.bench.runner import MethodContender

    real_generate = MethodContender.generate

    def perturbed(self, prompt_ids, max_new_tokens, temperature, seed):
        answer = real_generate(self, prompt_ids, max_new_tokens, temperature, seed)
        if self.name == "ngram" and len(answer.token_ids) > 5:
            answer.token_ids[5] += 1
        return answer

    monkeypatch.setattr(MethodContender, "generate", perturbed)
    out = tmp_path / "out"
    status = bench("--questions", str(two_questions(tmp_path)), "--max-new-tokens", "16", "--methods", "ngram",
                   "--peers", "none", "--out", str(out))
    captured = capsys.readouterr()
    assert status == 1
    assert "DIFFERS: ngram on question w turn 1, from token 5 on" in captured.err
    report = (out / "report.md").read_text()
    assert "🔴 **3/3 differ from ar (first at token 5)**" in report


@pytest.mark.slow
def test_sampling_with_repeats_reports_spread_and_does_not_judge_exactness(tmp_path):
    out = tmp_path / "out"
    status = bench("--questions", str(two_questions(tmp_path)), "--max-new-tokens", "8", "--methods", "ngram",
                   "--peers", "none", "--temperature", "1.0", "--repeats", "2", "--out", str(out))
    assert status == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({r["repeat"] for r in records}) == [0, 1] and len(records) == 2 * 3 * 2
    overall = json.loads((out / "summary.json").read_text())["scopes"]["overall"]
    assert overall["ngram"]["tokens_per_s"]["std"] is not None
    assert overall["ngram"]["differing_answers"] is None
    assert "n/a (sampling)" in (out / "report.md").read_text()


def test_a_base_model_without_chat_template_gets_the_conversation_as_plain_text():
    """gemma-3-270m has no chat template: a question (and a later turn after the answer) goes in
    as plain text to continue, not through a template it lacks."""
    from types import SimpleNamespace

    from fastdecode.bench.runner import _prompt_ids

    seen = []
    tokenizer = SimpleNamespace(info=SimpleNamespace(chat_template=None))
    llm = SimpleNamespace(tokenizer=tokenizer, prompt_ids=lambda text, raw=False: seen.append((text, raw)) or [1])
    messages = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert _prompt_ids(llm, messages) == [1]
    assert seen == [("Q1\n\nA1\n\nQ2\n\n", True)]
