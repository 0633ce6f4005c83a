"""Trained draft heads (and LUD's placeholders): their modules, their files, and which ones ship for which model.

A head file is `<name>.safetensors` (the head's weights, bfloat16, and its draft vocabulary) beside
`<name>.json`, its card: the target model and the sha256 of its weights file, the head's config,
its training data and run, and the acceptance it measured. A head is tied to one target: loading
it for another model is an error that says so. Heads for the models fastdecode names ship inside
the package (`heads/shipped/<model>/<kind>.*`); any other is passed by path
(`--option eagle.head=PATH`) or trained with `fastdecode train`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import FastDecodeError
from ..files import atomic_write
from .eagle import EagleHead
from .lud import Placeholders
from .medusa import HydraHeads, MedusaHeads

HEAD_CLASSES = {cls.kind: cls for cls in (EagleHead, MedusaHeads, HydraHeads, Placeholders)}
HEAD_KINDS = ("eagle", "medusa", "hydra")  # trained on stored features (train/features.py)
KINDS = tuple(HEAD_CLASSES)  # what `fastdecode train --heads` takes: those and LUD's placeholders
SHIPPED = Path(__file__).with_name("shipped")


def make_head(kind: str, model, draft_ids: list[int], **options) -> torch.nn.Module:
    """A new, untrained head of this kind for `model`, over the draft vocabulary `draft_ids`."""
    if kind not in HEAD_CLASSES:
        raise FastDecodeError(f"unknown head kind {kind!r}; kinds: {', '.join(HEAD_KINDS)}")
    return HEAD_CLASSES[kind].from_target(model, draft_ids, **options)


_fingerprints: dict[tuple, str] = {}


def fingerprint(path: Path) -> str:
    """sha256 of a model's weights: the GGUF file, or a checkpoint folder's safetensors files."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("weights-"))
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _fingerprints:
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
        _fingerprints[key] = digest.hexdigest()
    return _fingerprints[key]


def save_head(head: torch.nn.Module, path: str | Path, card: dict) -> Path:
    """Write `path`.safetensors and `path`.json atomically; returns the safetensors path."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous()
               for k, v in head.state_dict().items()}
    card = dict(card, config=head.config())
    for suffix, write in ((".safetensors", lambda p: save_file(tensors, str(p))),
                          (".json", lambda p: p.write_text(json.dumps(card, indent=1)))):
        atomic_write(path.with_suffix(suffix), write)
    return path.with_suffix(".safetensors")


def head_files(path: str | Path) -> tuple[Path, Path]:
    """The (weights, card) files of a head given as its .safetensors, its .json or their shared stem;
    an error unless both exist."""
    given = Path(path).expanduser()
    if given.suffix in (".safetensors", ".json"):
        stem = given.with_suffix("")
    elif given.is_file():
        raise FastDecodeError(f"{given} is not a head: pass its .safetensors file (with the .json card beside it)")
    else:  # the shared stem, which may hold dots of its own ("eagle.v2")
        stem = given
    files = stem.parent / f"{stem.name}.safetensors", stem.parent / f"{stem.name}.json"
    for f in files:
        if not f.is_file():
            raise FastDecodeError(f"head file {f} does not exist (a head is a .safetensors file with a .json card beside it)")
    return files


def load_head(path: str | Path, model=None, model_file: Path | None = None) -> tuple[torch.nn.Module, dict]:
    """A head and its card from `path` (.safetensors, .json or the shared stem). With `model` (and
    the file it was loaded from) it checks that the head was trained for that model and attaches it."""
    weights, card_path = head_files(path)
    stem = weights.with_suffix("")
    try:
        card = json.loads(card_path.read_text())
        cfg = card["config"]
        cls = HEAD_CLASSES[cfg["kind"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise FastDecodeError(f"{card_path} is not a head card ({exc})") from exc
    if model is not None:
        _check_target(card, cfg, model, model_file, stem)
    try:
        head = cls(cfg)
        state = load_file(str(weights))
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    except (SafetensorError, RuntimeError, OSError, KeyError, TypeError, ValueError) as exc:
        raise FastDecodeError(f"{weights} is not a readable {cfg['kind']} head ({str(exc).splitlines()[0][:160]})") from exc
    if model is not None:
        head.attach(model)
    return head.eval(), card


def _check_target(card: dict, cfg: dict, model, model_file: Path | None, stem: Path) -> None:
    trained_for = card.get("target", {})
    c = model.config
    if (cfg.get("hidden_size"), cfg.get("vocab_size")) != (c.hidden_size, c.vocab_size):
        raise FastDecodeError(
            f"head {stem.name} was trained for {trained_for.get('model', 'another model')} "
            f"(hidden size {cfg.get('hidden_size')}, vocabulary {cfg.get('vocab_size')}); the loaded model has "
            f"hidden size {c.hidden_size} and vocabulary {c.vocab_size}")
    expected = trained_for.get("sha256")
    if model_file is not None and expected and fingerprint(model_file) != expected:
        raise FastDecodeError(
            f"head {stem.name} was trained for {trained_for.get('model', 'another model')} (weights sha256 "
            f"{expected[:12]}...), not for {model_file.name}; train one for it with `fastdecode train --model {model_file}`")


def shipped_head(kind: str, model_name: str) -> Path | None:
    """The head of this kind shipped for a named model, if there is one."""
    path = SHIPPED / model_name / f"{kind}.safetensors"
    return path if path.is_file() else None
