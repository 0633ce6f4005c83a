"""A trained head's files: `<name>.safetensors` (its weights) and `<name>.json` (its card).

The card says what the head is for and how it came to be: the target model and a hash of its
weights (a head only drafts well for the exact model it was trained on), the head's config, the
layers it reads, the draft vocabulary's size (the ids are the `draft_vocab` tensor of the weights
file), the training data, steps, seed, commit, time per stage and the acceptance measured on
held-out prompts after each epoch. Files are written under a temporary name and renamed into
place, so an interruption never leaves a half-written head behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

DRAFT_VOCAB = "draft_vocab"  # the tensor of the weights file holding the draft vocabulary's ids


def atomic_write(path: Path, write) -> None:
    """write(temporary path), then rename it to `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def weights_sha256(source: Path) -> str:
    """sha256 of a GGUF file, or of a checkpoint folder's weight files (in name order, as one stream)."""
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def git_commit() -> str | None:
    """The commit of the repository fastdecode runs from, or None (an installed package, no git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def write_head(head: torch.nn.Module, draft_vocab: list[int], folder: Path, name: str, card: dict) -> tuple[Path, Path]:
    """Write the head's weights (float32, with the draft vocabulary) and its card; return both paths."""
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone(memory_format=torch.contiguous_format)
               for k, v in head.state_dict().items()}
    tensors.setdefault(DRAFT_VOCAB, torch.tensor(draft_vocab, dtype=torch.int64))
    weights, card_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    atomic_write(weights, lambda p: save_file(tensors, str(p)))
    atomic_write(card_path, lambda p: p.write_text(json.dumps(card, indent=1) + "\n"))
    return weights, card_path
