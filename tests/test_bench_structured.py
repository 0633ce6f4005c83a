"""`fastdecode bench --structured` (bench/structured.py): JSON-Schema tasks under every method, end to end on
the real default model, and the pieces that need no model (schema sources, the filter, validity)."""
import json

import pytest

from fastdecode.bench import structured
from fastdecode.cli import main

pytest.importorskip("jsonschema")


@pytest.mark.slow
def test_two_handmade_schemas_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["bench", "--structured", "--schemas", "2", "--schema-source", "handmade", "--methods", "ar,auto",
                   "--max-new-tokens", "96", "--peers", "none", "--out", str(out)])
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["contenders"] == ["ar", "auto"]
    assert summary["schemas_run"] == ["handmade:person", "handmade:product"]
    assert summary["coverage"]["handmade"]["tried"] == summary["coverage"]["handmade"]["compiled"] == 2
    for name, f in summary["methods"].items():
        assert f["ran"] == 2 and f["finished"] >= 1, name
        assert f["valid"] == f["finished"] and f["valid_share"] == 1.0, name  # every finished output validates
        assert f["tokens_per_s"] > 0 and f["compile_ms"] > 0 and 0 < f["mask_share"] < 1, name
        assert f["decode_speedup"] > 0 and f["tokens_per_forward"] >= 1.0 and f["mask_ms_per_token"] > 0, name
    ar, auto = summary["methods"]["ar"], summary["methods"]["auto"]
    assert ar["differing"] is None and auto["differing"] == 0
    assert ar["speedup"] == pytest.approx(1.0) and auto["speedup"] > 0
    assert ar["forced_share"] == 0.0  # the baseline drafts nothing, not even forced tokens
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 4
    by = {(r["schema"], r["method"]): r for r in records}
    for schema in ("person", "product"):
        assert by[schema, "auto"]["token_ids"] == by[schema, "ar"]["token_ids"]
    assert "| `auto`" not in (out / "report.md").read_text() and "| auto |" in (out / "report.md").read_text()
    assert "speedup" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--peers", "hf"], "--structured runs one peer, llamacpp"),
    (["--schema-source", "nowhere"], "unknown schema source 'nowhere'"),
    (["--schemas", "0"], "--schemas takes 1 or more"),
    (["--temperature", "0.5"], "decodes greedily"),
])
def test_bad_structured_arguments_exit_2(args, message, tmp_path, capsys):
    assert main(["bench", "--structured", *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_filter_and_validity():
    assert structured.ineligible({"type": "object", "properties": {"a": {"$ref": "https://x.org/a.json"}}}) == "remote $ref"
    assert structured.ineligible({"type": "array", "items": {}}) == "no top-level properties"
    assert structured.ineligible({"type": "object", "properties": {"a": {"$ref": "#/definitions/a"}},
                                  "definitions": {"a": {"type": "string"}}}) is None
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert structured.validity('{"n": 3}', schema) == (True, None)
    assert structured.validity('{"n": "3"}', schema)[0] is False
    assert structured.validity('{"n": 3', schema)[0] is False


def test_handmade_tasks_and_prompts():
    tasks, info = structured.choose_tasks(["handmade"], 3, seed=0)
    assert [t.name for t in tasks] == ["person", "product", "event"] and info["handmade"]["sampled"] == 3
    text = structured.prompt_text(tasks[0])
    assert "Person" in text and '"hobbies"' in text and "JSON object" in text
    assert json.loads(tasks[0].constraint_text("compact"))["x-guidance"] == {"whitespace_flexible": False}
