"""The reference against an independent implementation: Hugging Face transformers on PyTorch (CPU).

float64: logits agree to 1e-8 (max abs). transformers computes RMSNorm and the
rotary angles in float32 even for a float64 model, so for the float64 check
those two pieces of its model are lifted to float64 (see `lift_to_float64`);
everything else (projections, rotation, GQA, masking, softmax, MLP, tying,
config parsing) is transformers' own code. The rotary frequencies it computes
itself (llama3 scaling included) are first checked against ours.

float32: logits agree to 1e-3 with the same arg-max at every position, and
SmolLM2's greedy continuations of chat prompts are token-identical.
"""

from __future__ import annotations

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
from reference.model.rope import inverse_frequencies  # noqa: E402
from reference.model.transformer import prefill  # noqa: E402

pytestmark = pytest.mark.crosscheck
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOLERANCE = {"float64": 1e-8, "float32": 1e-3}


def lift_to_float64(model, cfg) -> None:
    """Make transformers' RMSNorm and rotary embedding compute in the model's dtype (float64)."""

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = rms_norm.__get__(module)

    rotary = model.model.rotary_emb
    ours = torch.tensor(inverse_frequencies(cfg), dtype=torch.float64)
    theirs = rotary.inv_freq.to(torch.float64)  # transformers' own frequencies, in float32
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=0)

    def rotary_forward(self, x, position_ids):
        angles = position_ids[..., None].to(torch.float64) * ours
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
