"""Convert a GGUF file's metadata once into a cache folder that later loads in a second.

<cache>/models/<file stem>-<key>/
    config.json                   ModelConfig
    tensors.json                  where each tensor's blocks are in the file (gguf_file.TensorInfo)
    tokenizer.json, tokenizer_info.json
    weights-<dtype>.safetensors   dequantized weights, written the first time a dense weight format
                                  (--weights bfloat16 | float32) is asked for; the file's own
                                  formats are read from the GGUF file itself (models/weights.py)

The key hashes the file's path, size and modification time, so a changed file converts again.
Every file is written under a temporary name and renamed into place: an interrupted conversion
leaves nothing half-written behind.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..files import atomic_write
from ..tokenizer import TokenizerInfo
from .cache_dir import cache_root
from .config import ModelConfig
from .gguf_file import GGUFFile, TensorInfo, hf_state_dict


def cache_folder(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def prepare(gguf_path: Path, dtype: torch.dtype | None) -> Path:
    """Make sure the cache folder holds config, tokenizer and (unless dtype is None) weights in
    `dtype`; return it."""
    folder = cache_folder(gguf_path)
    weights = folder / f"weights-{str(dtype).removeprefix('torch.')}.safetensors"
    needed = [folder / "config.json", folder / "tensors.json", folder / "tokenizer.json", folder / "tokenizer_info.json"]
    needed += [weights] if dtype is not None else []
    if all(p.exists() for p in needed):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gguf = GGUFFile(gguf_path)
    config = gguf.model_config()
    if not (folder / "config.json").exists():
        atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config.to_dict(), indent=1)))
    if not (folder / "tensors.json").exists():
        table = [t.to_dict() for t in gguf.tensor_infos()]
        atomic_write(folder / "tensors.json", lambda p: p.write_text(json.dumps(table)))
    if not (folder / "tokenizer.json").exists() or not (folder / "tokenizer_info.json").exists():
        _convert_tokenizer(gguf, folder)
    if dtype is not None and not weights.exists():
        tensors = {}
        bar = tqdm(
            hf_state_dict(gguf, config), total=len(gguf.tensor_infos()), file=sys.stderr,
            desc=f"Converting {gguf_path.name} to {dtype} (first load only)", unit="tensor",
        )
        for name, arr in bar:
            tensors[name] = torch.from_numpy(arr).to(dtype)
        atomic_write(weights, lambda p: save_file(tensors, str(p)))
    return folder


def _convert_tokenizer(gguf: GGUFFile, folder: Path) -> None:
    print(f"Converting the tokenizer of {gguf.path.name} (first load only)...", file=sys.stderr)
    from transformers import AutoTokenizer  # heavy import, needed once per file

    hf = AutoTokenizer.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
    eos_ids = {gguf.field("tokenizer.ggml.eos_token_id"), gguf.field("tokenizer.ggml.eot_token_id")}
    info = TokenizerInfo(
        bos_token=hf.bos_token,
        eos_token=hf.eos_token,
        bos_id=gguf.field("tokenizer.ggml.bos_token_id"),
        eos_ids=sorted(int(i) for i in eos_ids if i is not None),
        add_bos=bool(gguf.field("tokenizer.ggml.add_bos_token", False)),
        chat_template=gguf.field("tokenizer.chat_template"),
    )
    atomic_write(folder / "tokenizer_info.json", info.save)
    atomic_write(folder / "tokenizer.json", lambda p: hf.backend_tokenizer.save(str(p)))


def tensor_table(folder: Path) -> list[TensorInfo]:
    """The tensors of the GGUF file a cache folder was made from (prepare writes them)."""
    return [TensorInfo.from_dict(d) for d in json.loads((folder / "tensors.json").read_text())]
