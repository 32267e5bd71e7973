"""Long prompts with a fact hidden inside, for demos and tests (deterministic by seed).

The passkey prompt follows InfiniteBench's passkey task: a haystack of the
repeated filler "The grass is green. The sky is blue. ..." with the sentence
"The pass key is K. Remember it. K is the pass key." inserted at a chosen depth,
and a question at the end. Lengths are measured in the model's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.tokenizer import Tokenizer, encode_chat

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key?"


@dataclass(frozen=True)
class NeedlePrompt:
    ids: list[int]  # the whole prompt, chat template applied when asked
    text: str  # the user message
    answer: str  # what a correct completion contains
    needle: str  # the hidden sentence


def passkey_prompt(
    tok: Tokenizer, n_tokens: int = 1000, seed: int = 0, depth: float = 0.5, chat: bool = True
) -> NeedlePrompt:
    """A prompt of about n_tokens tokens with a 5-digit pass key hidden at `depth` (0 = start)."""
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10_000, 100_000)))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    intro = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    fixed = len(tok.encode(intro + needle + "\n\n" + QUESTION, add_special_tokens=False))
    per_filler = len(tok.encode(FILLER * 10, add_special_tokens=False)) / 10
    n_filler = max(0, round((n_tokens - fixed - 40) / per_filler))  # ~40 tokens of chat template
    before = round(n_filler * depth)
    text = intro + FILLER * before + needle + FILLER * (n_filler - before) + "\n\n" + QUESTION
    ids = encode_chat(tok, text) if chat else tok.encode(text)
    return NeedlePrompt(ids=ids, text=text, answer=key, needle=needle)
