"""Read a model folder: config.json, *.safetensors, tokenizer.json (+ tokenizer_config.json).

This is both the Hugging Face checkpoint layout users bring and the layout of our GGUF cache
(which adds tokenizer_info.json and names its weights weights-<dtype>.safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import FastDecodeError
from ..tokenizer import Tokenizer, TokenizerInfo
from .config import ModelConfig


def read_config(folder: Path) -> ModelConfig:
    try:
        cfg = json.loads((folder / "config.json").read_text())
        # Our own cache stores a ModelConfig; a Hugging Face folder stores its own schema.
        return ModelConfig.from_dict(cfg) if "num_layers" in cfg else ModelConfig.from_hf(cfg)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise FastDecodeError(f"{folder / 'config.json'} is not a usable model config: {exc!r}") from exc


def read_weights(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    weights = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                weights[name] = st.get_tensor(name).to(dtype)
    return weights


def read_tokenizer(folder: Path) -> Tokenizer:
    if not (folder / "tokenizer.json").exists():
        raise FastDecodeError(f"{folder} has no tokenizer.json (a fast tokenizer file is required)")
    info_file = folder / "tokenizer_info.json"
    if info_file.exists():
        return Tokenizer(folder / "tokenizer.json", TokenizerInfo.load(info_file))
    return Tokenizer(folder / "tokenizer.json", _hf_tokenizer_info(folder))


def _hf_tokenizer_info(folder: Path) -> TokenizerInfo:
    def load(name):
        p = folder / name
        return json.loads(p.read_text()) if p.exists() else {}

    tcfg, gcfg, cfg = load("tokenizer_config.json"), load("generation_config.json"), load("config.json")
    vocab = json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", [])
    ids = {t["content"]: t["id"] for t in vocab}

    def token(key):
        t = tcfg.get(key)
        return t.get("content") if isinstance(t, dict) else t

    bos, eos = token("bos_token"), token("eos_token")
    eos_ids = gcfg.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
    if eos in ids:
        eos_ids.append(ids[eos])
    template = tcfg.get("chat_template")
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    return TokenizerInfo(
        bos_token=bos,
        eos_token=eos,
        bos_id=ids.get(bos, cfg.get("bos_token_id")),
        eos_ids=sorted({int(i) for i in eos_ids if i is not None}),
        add_bos=bool(tcfg.get("add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )
