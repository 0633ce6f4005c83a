"""fastdecode: faster text generation from language models, with unchanged output."""
from .api import LLM
from .engine import GenerationResult
from .errors import FastDecodeError
from .runtime.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "GenerationResult", "FastDecodeError"]
__version__ = "0.1.0"
