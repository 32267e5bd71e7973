"""Long prompts with a fact hidden inside, for demos and tests (deterministic by seed).

The passkey prompt follows InfiniteBench's passkey task: a haystack of the
repeated filler "The grass is green. The sky is blue. ..." with the sentence
"The pass key is K. Remember it. K is the pass key." inserted at a chosen depth,
and a question at the end. Lengths are measured in the model's own tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference.io.tokenizer import Tokenizer, encode_chat, load_tokenizer

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


NEEDLE_KEYS = ["apple", "river", "candle", "violet", "harbor", "pepper", "meadow", "copper",
               "lantern", "falcon", "willow", "marble", "thunder", "saddle", "orchid", "glacier"]


def kv_needles_prompt(
    tok: Tokenizer, n_tokens: int = 1000, n_needles: int = 8, seed: int = 0, chat: bool = True
) -> NeedlePrompt:
    """RULER-style multi-key retrieval: n_needles similar "special magic number" sentences, one asked for."""
    rng = np.random.default_rng(seed)
    keys = [str(k) for k in rng.choice(NEEDLE_KEYS, size=n_needles, replace=False)]
    values = [str(int(v)) for v in rng.integers(1_000_000, 10_000_000, size=n_needles)]
    asked = int(rng.integers(n_needles))
    needles = [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)]
    question = f"What is the special magic number for {keys[asked]}?"
    intro = "Some special magic numbers are hidden inside the following text. Memorize them.\n\n"
    fixed = len(tok.encode(intro + "".join(needles) + "\n\n" + question, add_special_tokens=False))
    per_filler = len(tok.encode(FILLER * 10, add_special_tokens=False)) / 10
    n_filler = max(n_needles + 1, round((n_tokens - fixed - 40) / per_filler))  # room for n_needles distinct slots
    slots = np.sort(rng.choice(np.arange(1, n_filler), size=n_needles, replace=False))  # filler index before each needle
    parts, last = [intro], 0
    for slot, needle in zip(slots, needles):
        parts += [FILLER * (slot - last), needle]
        last = slot
    text = "".join(parts) + FILLER * (n_filler - last) + "\n\n" + question
    ids = encode_chat(tok, text) if chat else tok.encode(text)
    return NeedlePrompt(ids=ids, text=text, answer=values[asked], needle=needles[asked])


def needle_token_positions(tok: Tokenizer, prompt: NeedlePrompt) -> list[int]:
    """Positions in prompt.ids of every occurrence of the answer's tokens (as the tokenizer splits it)."""
    target = tok.encode(prompt.answer, add_special_tokens=False)
    ids = prompt.ids
    found = []
    for start in range(len(ids) - len(target) + 1):
        if ids[start : start + len(target)] == target:
            found += range(start, start + len(target))
    return found


def passkey_ids(model_dir, n_tokens: int, seed: int = 0) -> list[int]:
    """The token ids of `passkey_prompt` for a checkpoint directory (what `asl golden` puts in real-model bundles)."""
    return passkey_prompt(load_tokenizer(model_dir), n_tokens, seed=seed).ids
