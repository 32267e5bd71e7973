"""Tiny checkpoints (all four): reproducible from their generator, small, shaped for ASL; their tokenizer and
template."""

import numpy as np
import pytest

from reference.io import tiny
from reference.io.fetch import TINY_ALIASES
from reference.io.tokenizer import encode_chat, load_tokenizer, render_chat
from reference.model.config import load_config
from tests.conftest import CHECKPOINTS


@pytest.fixture(params=list(tiny.FAMILIES))
def tiny_dir(request):
    """Every committed tiny checkpoint (conftest's fixture covers the two the goldens use)."""
    return CHECKPOINTS / request.param


def test_every_generated_checkpoint_is_an_alias():
    assert list(tiny.FAMILIES) == list(TINY_ALIASES)


def test_generator_reproduces_the_committed_checkpoints_byte_for_byte():
    assert tiny.main(["--check"]) == 0


def test_tiny_checkpoints_are_small_and_shaped_for_asl(tiny_dir):
    size = sum(f.stat().st_size for f in tiny_dir.iterdir())
    assert size <= 2 * 1024 * 1024
    cfg = load_config(tiny_dir)
    assert cfg.num_hidden_layers >= 24  # ASL defaults: L_min = 10, L_obs = 8
    assert cfg.num_attention_heads != cfg.num_key_value_heads


def test_byte_level_tokenizer_round_trips_any_text(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    text = "Grüße 123\n\tnaïve — 日本語 🙂"
    ids = tok.encode(text)
    assert ids == [3 + b for b in text.encode("utf-8")]
    assert tok.decode(ids) == text


def test_chat_template_renders_chatml(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    text = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_chat(tok, "hi")
    assert ids[0] == tok.token_id("<|im_start|>") == 1 and ids.count(2) == 1


def test_shared_attention_base_makes_deep_layers_alike(tiny_dir):
    """The generator's design: q/k noise shrinks with depth, so deep layers' q projections converge."""
    from reference.io.checkpoint import load_weights

    w = load_weights(tiny_dir)
    shallow = np.linalg.norm(w.layers[1].wq - w.layers[2].wq)
    deep = np.linalg.norm(w.layers[21].wq - w.layers[22].wq)
    assert deep < 0.3 * shallow
