"""Cut a model down to some of its decoder layers: a cheap draft model with the same tokenizer.

make_truncated_checkpoint("smollm2-135m-instruct", 4, "draft4/") writes a Hugging Face style
checkpoint folder (config.json, model.safetensors, the tokenizer files) holding the embeddings,
the final norm, the head and the first 4 decoder layers; `load("draft4/")` loads it like any
other folder. The truncated model predicts the same vocabulary, just less well: good enough for
tests and benchmarks of classic speculative decoding (drafters/draft_model.py).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import FastDecodeError
from .loader import model_folder, weight_files

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def _source_weights(folder: Path) -> list[Path]:
    # A GGUF cache folder may hold several dtypes; float32 loses nothing when read back.
    for dtype in ("float32", "bfloat16"):
        if (folder / f"weights-{dtype}.safetensors").exists():
            return [folder / f"weights-{dtype}.safetensors"]
    return weight_files(folder, torch.float32)


def make_truncated_checkpoint(source: str | Path, layers: int | Sequence[int], out_dir: str | Path) -> Path:
    """Write a checkpoint folder with only some decoder layers of `source` and return its path.

    source: a registered model name, a .gguf file or a checkpoint folder (as `load` takes).
    layers: how many leading layers to keep, or the indices of the layers to keep (renumbered 0..).
    """
    folder = model_folder(source, torch.float32)
    config = json.loads((folder / "config.json").read_text())
    key = "num_layers" if "num_layers" in config else "num_hidden_layers"  # our cache / Hugging Face
    total = config[key]
    keep = list(range(layers)) if isinstance(layers, int) else [int(i) for i in layers]
    if not keep or any(not 0 <= i < total for i in keep) or len(set(keep)) != len(keep):
        raise FastDecodeError(f"layers must select 1 to {total} distinct layers of the {total} in {source}")
    new_index = {old: new for new, old in enumerate(keep)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for file in _source_weights(folder):
        with safe_open(str(file), framework="pt") as st:
            for name in st.keys():
                match = _LAYER.match(name)
                if match is None:
                    tensors[name] = st.get_tensor(name)
                elif int(match.group(1)) in new_index:
                    tensors[f"model.layers.{new_index[int(match.group(1))]}.{match.group(2)}"] = st.get_tensor(name)
    save_file(tensors, str(out / "model.safetensors"))
    config[key] = len(keep)
    if config.get("layer_types"):  # each kept layer keeps its kind (sliding or global attention)
        config["layer_types"] = [config["layer_types"][i] for i in keep]
    (out / "config.json").write_text(json.dumps(config, indent=1))
    # Tokenizer and generation files travel unchanged; weights and shard indexes do not.
    for file in folder.iterdir():
        skip = file.suffix == ".safetensors" or file.name.endswith(".index.json") or file.name == "config.json"
        if file.is_file() and not skip:
            shutil.copy2(file, out / file.name)
    return out
