"""Prompts shared by the drafters' tests on the real model: one that repeats a paragraph (drafting
pays) and one ordinary question (drafting has little to copy)."""
from __future__ import annotations

import pytest


def repeat(paragraph: str) -> str:
    return f"Repeat the following paragraph exactly, word for word:\n\n{paragraph}"


LIGHTHOUSE = repeat(
    "The old lighthouse stood at the edge of the cliff, its white paint peeling after decades of salt "
    "wind. Every night the keeper climbed the spiral stairs, trimmed the wick, and watched the beam "
    "sweep across the dark water."
)
EXERCISE = "What are three benefits of regular exercise?"
FOX = repeat(
    "The quick brown fox jumps over the lazy dog. The dog did not move, because it was asleep in the "
    "warm afternoon sun. Later, the fox came back with three friends, and together they ran across the field."
)
SEASONS = "What are the main causes of the seasons on Earth? Explain briefly."


def ar_answers_fixture(*prompts_and_params):
    """A module fixture `reference`: {prompt: plain decoding's result} for these prompts."""
    *prompts, params = prompts_and_params

    @pytest.fixture(scope="module")
    def reference(llm):
        return {prompt: llm.generate(prompt, params, method="ar") for prompt in prompts}

    return reference
