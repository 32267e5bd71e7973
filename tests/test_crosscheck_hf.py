"""The reference against an independent implementation: Hugging Face transformers on PyTorch (CPU).

float64: logits agree to 1e-8 (max abs). transformers computes RMSNorm and the
rotary angles in float32 even for a float64 model, so for the float64 check
those two pieces of its model are lifted to float64 (see `lift_to_float64`);
everything else (projections, Qwen3's q/k norms, Phi-3's fused projections,
rotation, GQA, masking, softmax, MLP, tying, config parsing) is transformers'
own code. The rotary frequencies it computes itself (llama3 scaling and both of
LongRoPE's factor sets included) are first checked against ours, and which
LongRoPE set a forward call uses stays transformers' own decision.

float32: logits agree to 1e-3 with the same arg-max at every position, and
SmolLM2's greedy continuations of chat prompts are token-identical.
tiny-qwen3 and tiny-phi3 (with prompts on both sides of Phi-3's
original_max_position_embeddings = 64) are checked the same way, and their
greedy continuations in float64 are token-identical, a Phi-3 generation that
crosses the boundary included (transformers recomputes the cache there).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reference.asl.generate import generate
from reference.eval.tasks import passkey_ids  # noqa: E402
from reference.io.checkpoint import (
    eos_token_ids,  # noqa: E402
    load_weights,  # noqa: E402
)
from reference.io.tokenizer import encode_chat, load_tokenizer  # noqa: E402
from reference.model.rope import attention_scaling, inverse_frequencies  # noqa: E402
from reference.model.transformer import decode_step, prefill  # noqa: E402
from tests.conftest import CHECKPOINTS  # noqa: E402

pytestmark = pytest.mark.crosscheck
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = {"float64": 1e-8, "float32": 1e-3}
NEW_TINY = ["tiny-qwen3", "tiny-phi3"]


def lift_to_float64(model, cfg) -> None:
    """Make transformers' RMSNorm and rotary embedding compute in the model's dtype (float64).

    The rotary module's own forward still runs first at every call, so transformers itself picks the
    frequencies (LongRoPE: short or long factors, from the call's positions); the lifted forward then uses
    our float64 copy of the set it picked (each set checked against transformers' float32 one), and records
    which set that was in `rotary.chosen` (0 short / default, 1 long).
    """

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = rms_norm.__get__(module)

    rotary = model.model.rotary_emb
    theirs_forward = rotary.forward  # bound, with transformers' dynamic_rope_update around it
    ours = [torch.tensor(inverse_frequencies(cfg, long), dtype=torch.float64) for long in (False, True)]
    torch.testing.assert_close(rotary.inv_freq.to(torch.float64), ours[0], rtol=1e-6, atol=0)
    assert rotary.attention_scaling == pytest.approx(attention_scaling(cfg), rel=1e-15)
    if cfg.rope_scaling.rope_type == "longrope":  # a call of original_max + 1 positions: transformers' long set
        last = cfg.rope_scaling.original_max_position_embeddings
        theirs_forward(torch.zeros(1, dtype=torch.float32), torch.tensor([[last]]))
        torch.testing.assert_close(rotary.inv_freq.to(torch.float64), ours[1], rtol=1e-6, atol=0)
        assert not torch.allclose(ours[0], ours[1])  # the two sets are told apart below
    rotary.chosen = []

    def rotary_forward(self, x, position_ids):
        theirs_forward(x, position_ids)  # transformers decides the set for this call (self.inv_freq)
        picked = [i for i, f in enumerate(ours) if torch.allclose(self.inv_freq.to(torch.float64), f, rtol=1e-6, atol=0)]
        self.chosen.append(picked[0])
        angles = position_ids[..., None].to(torch.float64) * ours[picked[0]]
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * self.attention_scaling).to(x.dtype), (angles.sin() * self.attention_scaling).to(x.dtype)

    rotary.forward = rotary_forward.__get__(rotary)


def hf_model(model_dir, dtype: str):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=TORCH_DTYPES[dtype], attn_implementation="sdpa"
    )
    model.eval()
    if dtype == "float64":
        lift_to_float64(model, load_weights(model_dir, "float32").config)
    return model


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def assert_logits_agree(ours: np.ndarray, theirs: np.ndarray, dtype: str) -> None:
    assert ours.shape == theirs.shape
    err = float(np.abs(ours - theirs).max())
    print(f"max abs logit difference {err:.3g} ({dtype})")  # the measured number docs quote: pytest -s
    assert err <= TOLERANCE[dtype], f"max abs logit difference {err:.3g} > {TOLERANCE[dtype]} ({dtype})"
    if dtype == "float32":
        mismatch = np.flatnonzero(ours.argmax(-1) != theirs.argmax(-1))
        assert mismatch.size == 0, f"arg-max differs at positions {mismatch[:10].tolist()}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_tokens", [1, 17, 1000])
def test_tiny_checkpoints_match_transformers(tiny_dir, dtype, n_tokens):
    ids = np.random.default_rng(n_tokens).integers(0, 259, n_tokens).tolist()
    ours, _ = prefill(load_weights(tiny_dir, dtype), ids, all_logits=True)
    assert_logits_agree(ours, hf_logits(hf_model(tiny_dir, dtype), ids), dtype)


@pytest.fixture(scope="module")
def smollm2_passkey_ids(smollm2_dir):
    return passkey_ids(smollm2_dir, 1000)


@pytest.mark.smollm2
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_smollm2_matches_transformers(smollm2_dir, smollm2_passkey_ids, dtype):
    weights, model = load_weights(smollm2_dir, dtype), hf_model(smollm2_dir, dtype)
    for ids in ([1], smollm2_passkey_ids):
        ours, _ = prefill(weights, ids, all_logits=True)
        assert_logits_agree(ours, hf_logits(model, ids), dtype)
    assert 900 <= len(smollm2_passkey_ids) <= 1100


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]


@pytest.mark.smollm2
def test_smollm2_chat_template_matches_transformers(smollm2_dir):
    theirs = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    tok = load_tokenizer(smollm2_dir)
    for text in CHAT_PROMPTS:
        expected = theirs.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert encode_chat(tok, text) == list(expected)


@pytest.mark.smollm2
def test_smollm2_greedy_continuations_are_token_identical(smollm2_dir):
    weights, tok = load_weights(smollm2_dir), load_tokenizer(smollm2_dir)
    model = hf_model(smollm2_dir, "float32")
    eos = eos_token_ids(smollm2_dir, weights.config)
    for text in CHAT_PROMPTS:
        ids = encode_chat(tok, text)
        ours = generate(weights, ids, 24, eos).generated_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=list(eos),
                                 pad_token_id=eos[0])
        theirs = out[0, len(ids):].tolist()
        assert ours == theirs, f"{text!r}: ours {tok.decode(ours)!r} vs transformers {tok.decode(theirs)!r}"


def _variant(tmp_path, change: dict, biases: bool = False):
    """tiny-llama with a changed config.json (and, with `biases`, random q/k/v/o biases added)."""
    import json
    import shutil

    from reference.io.safetensors import map_tensor, open_mapped, read_header, save
    from tests.conftest import CHECKPOINTS

    d = tmp_path / "variant"
    shutil.copytree(CHECKPOINTS / "tiny-llama", d)
    cfg = json.loads((d / "config.json").read_text()) | change
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    if biases:
        rng = np.random.default_rng(7)
        for shard in sorted(d.glob("model-*.safetensors")):
            header = read_header(shard)
            mapped = open_mapped(header)
            tensors = {n: np.array(map_tensor(header, n, mapped)) for n in header.tensors}
            for name in [n for n in tensors if n.endswith("_proj.weight") and ".self_attn." in n]:
                tensors[name.replace(".weight", ".bias")] = rng.standard_normal(tensors[name].shape[0]).astype(np.float32)
            del mapped
            save(tensors, shard)
        index = json.loads((d / "model.safetensors.index.json").read_text())
        index["weight_map"] |= {n.replace(".weight", ".bias"): s for n, s in index["weight_map"].items()
                                if n.endswith("_proj.weight") and ".self_attn." in n}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


@pytest.mark.parametrize(
    "name, change, biases",
    [
        ("llama, linear rope scaling", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, False),
        ("llama, no rope scaling", {"rope_scaling": None}, False),
        ("llama, attention_bias (q/k/v/o biases)", {"attention_bias": True}, True),
        ("mistral", {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "rope_scaling": None,
                     "sliding_window": None}, False),
    ],
)
def test_architecture_variants_match_transformers(tmp_path, name, change, biases):
    d = _variant(tmp_path, change, biases)
    ids = np.random.default_rng(11).integers(0, 259, 300).tolist()
    weights = load_weights(d, "float64")
    assert weights.config.o_proj_bias == biases
    ours, _ = prefill(weights, ids, all_logits=True)
    assert_logits_agree(ours, hf_logits(hf_model(d, "float64"), ids), "float64")


# ---------------------------------------------------------------- Qwen3 and Phi-3


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n_tokens", [1, 40, 100])
@pytest.mark.parametrize("name", NEW_TINY)
def test_qwen3_and_phi3_match_transformers(name, dtype, n_tokens):
    """40 tokens: Phi-3 within original_max_position_embeddings = 64 (short factors); 100: past it (long)."""
    d = CHECKPOINTS / name
    ids = np.random.default_rng(n_tokens).integers(0, 259, n_tokens).tolist()
    weights, model = load_weights(d, dtype), hf_model(d, dtype)
    ours, _ = prefill(weights, ids, all_logits=True)
    assert_logits_agree(ours, hf_logits(model, ids), dtype)
    if dtype == "float64":
        long = weights.config.rope_scaling.rope_type == "longrope" and n_tokens > 64
        assert model.model.rotary_emb.chosen == [int(long)]  # transformers' own choice, one forward call


def hf_greedy(model, ids, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def greedy_by_prefill(weights, ids, n: int) -> list[int]:
    """Greedy tokens, each from a fresh prefill of everything so far (no cache)."""
    ids = list(ids)
    for _ in range(n):
        logits, _ = prefill(weights, ids)
        ids.append(int(np.argmax(logits)))
    return ids[-n:]


@pytest.mark.parametrize("name, n_prompt", [("tiny-qwen3", 40), ("tiny-phi3", 20), ("tiny-phi3", 100)])
def test_greedy_continuations_are_token_identical(name, n_prompt):
    """float64, 12 new tokens; Phi-3's stay on one side of the boundary (20 + 12 <= 64; 100 > 64)."""
    d = CHECKPOINTS / name
    ids = np.random.default_rng(n_prompt).integers(3, 259, n_prompt).tolist()
    weights = load_weights(d, "float64")
    ours = generate(weights, ids, 12, ()).generated_ids
    assert ours == hf_greedy(hf_model(d, "float64"), ids, 12)


def test_phi3_generation_across_the_boundary_is_transformers_recompute():
    """A Phi-3 generation from 58 tokens to 70 crosses original_max_position_embeddings = 64: at the step whose
    sequence reaches 65 tokens transformers' Phi3ForCausalLM drops its cache and recomputes everything with the
    long factors (prepare_inputs_for_generation). Its greedy tokens are exactly those of a fresh prefill of the
    whole sequence at every step (the per-call rule, docs/models.md); decoding on with the short-factor cache
    gives other logits at that step, and those are exactly transformers' own when its model is called with the
    cache (no generate): the per-call rule, keys cached short, the new token long."""
    d = CHECKPOINTS / "tiny-phi3"
    ids = np.random.default_rng(58).integers(3, 259, 58).tolist()
    weights = load_weights(d, "float64")
    model = hf_model(d, "float64")
    theirs = hf_greedy(model, ids, 12)
    assert 1 in model.model.rotary_emb.chosen and 0 in model.model.rotary_emb.chosen  # both sets were used
    assert greedy_by_prefill(weights, ids, 12) == theirs
    gen = generate(weights, ids, 12, ())  # the reference's generate recomputes at the same step
    assert gen.generated_ids == theirs and gen.recomputed_at == 64 - len(ids) + 1
    # the cached path at the crossing step (position 64, the 65th token) is not transformers'
    sequence = ids + theirs[:64 - len(ids)]  # 64 tokens: positions 0 .. 63, all short
    _, cache = prefill(weights, sequence[:-1])
    cached, _ = decode_step(weights, cache, sequence[-1], 63)  # still short: the same as a prefill
    fresh, _ = prefill(weights, sequence)
    assert float(np.abs(cached - fresh).max()) < 1e-9
    nxt = theirs[64 - len(ids)]
    crossing_cached, _ = decode_step(weights, prefill(weights, sequence)[1], nxt, 64)  # long q/k on short keys
    crossing_fresh, _ = prefill(weights, sequence + [nxt])
    assert float(np.abs(crossing_cached - crossing_fresh).max()) > 1e-3
    model.model.rotary_emb.chosen.clear()
    with torch.no_grad():
        first = model(torch.tensor([sequence]), use_cache=True)
        step = model(torch.tensor([[nxt]]), cache=first.cache, use_cache=True)
    assert model.model.rotary_emb.chosen == [0, 1]  # the 64-token call short, the step at position 64 long
    assert_logits_agree(crossing_cached, step.logits[0, -1].numpy(), "float64")


# ---------------------------------------------------------------- Qwen3 and Phi-3 beyond the committed shapes

FAMILY_VARIANTS = {  # base checkpoint, config changes: the shapes real Qwen3 and Phi-3 checkpoints come in
    "qwen3, no GQA, head_dim = D/H, tied": ("tiny-qwen3", dict(num_attention_heads=4, num_key_value_heads=4,
                                                                 head_dim=8, tie_word_embeddings=True)),
    "qwen3, 8 heads over 2, head_dim 32 > D/H, biases": ("tiny-qwen3", dict(num_attention_heads=8, num_key_value_heads=2,
                                                                       head_dim=32, attention_bias=True)),
    "phi3, no GQA, no rope scaling (as Phi-3-mini-4k)": ("tiny-phi3", dict(num_key_value_heads=4, rope_scaling=None)),
    "phi3, 8 heads over 4, D 64, longrope L0 = 48": ("tiny-phi3", dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=4, original_max_position_embeddings=48,
        rope_scaling=dict(type="longrope", short_factor=[1.0, 1.05, 1.1, 1.3], long_factor=[1.0, 3.0, 6.0, 16.0]))),
}


def _family_variant(tmp_path, monkeypatch, base: str, change: dict):
    from reference.io import tiny

    spec = json.loads(json.dumps(tiny.FAMILIES[base]))
    spec["config"].update(change, num_hidden_layers=6)
    monkeypatch.setitem(tiny.FAMILIES, "variant", spec)
    return tiny.write_tiny_checkpoint("variant", tmp_path / "variant")


@pytest.mark.parametrize("name", FAMILY_VARIANTS)
def test_qwen3_and_phi3_variants_match_transformers(name, tmp_path, monkeypatch):
    """Logits of 30 and 90 tokens (Phi-3: both sides of L0) to float64's 1e-8, and 12 greedy tokens from a prompt just
    below L0 (Phi-3's generation crosses it and recomputes, as transformers' generate does), identical."""
    base, change = FAMILY_VARIANTS[name]
    d = _family_variant(tmp_path, monkeypatch, base, change)
    weights, model = load_weights(d, "float64"), hf_model(d, "float64")
    for n in (30, 90):
        ids = np.random.default_rng(n).integers(3, 259, n).tolist()
        ours, _ = prefill(weights, ids, all_logits=True)
        assert_logits_agree(ours, hf_logits(model, ids), "float64")
    ids = np.random.default_rng(1).integers(3, 259, 42).tolist()
    gen = generate(weights, ids, 12, ())
    assert gen.generated_ids == hf_greedy(model, ids, 12), name
    L0 = weights.config.rope_scaling.original_max_position_embeddings
    crosses = weights.config.rope_scaling.rope_type == "longrope" and 42 <= L0 < 42 + 11
    assert (gen.recomputed_at is not None) == crosses
