"""Deterministic generator of the tiny committed checkpoints (tiny-llama, tiny-qwen2, tiny-qwen3, tiny-phi3).

    python -m reference.io.tiny            # rewrites reference/io/checkpoints/tiny-*
    python -m reference.io.tiny --check    # exit 1 if the committed files differ

All are real Hugging Face-layout checkpoints with grouped-query attention and
24 layers (so ASL's defaults L_min = 10, L_obs = 8 apply), a byte-level BPE
tokenizer.json and a ChatML chat template. Weights are random but seeded, and
built so that attention patterns settle with depth: each layer's q/k
projections are a shared base plus noise that shrinks with depth, the way
token rankings stabilise in deeper layers of trained models.

- tiny-llama: Llama, H=4, H_kv=2, D=32, untied LM head, llama3 rope scaling,
  float32, stored as two shards with model.safetensors.index.json.
- tiny-qwen2: Qwen2, H=6, H_kv=2, D=48, q/k/v biases, tied embeddings,
  stored in bfloat16.
- tiny-qwen3: Qwen3, H=4, H_kv=2, D=32, head_dim 16 (not D / H = 8), per-head
  q_norm / k_norm, no biases, untied LM head, stored in bfloat16.
- tiny-phi3: Phi-3, H=4, H_kv=2, D=32, fused qkv_proj and gate_up_proj, untied
  LM head, LongRoPE with original_max_position_embeddings = 64 (so runs of
  either factor set are a few dozen tokens), stored in bfloat16.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from reference.io.safetensors import save

CHECKPOINTS = Path(__file__).parent / "checkpoints"
PHI3_QK_SCALE = 2**-0.5  # tiny-phi3's q/k projections, against its LongRoPE attention factor of √2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; bytes follow
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

FAMILIES = {
    "tiny-llama": dict(
        seed=20260101,
        config=dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=24,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=256,
            ),
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            attention_bias=False,
        ),
        dtype="F32",
        shards=2,
    ),
    "tiny-qwen2": dict(
        seed=20260102,
        config=dict(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=24,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=8,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            use_sliding_window=False,
            sliding_window=4096,
        ),
        dtype="BF16",
        shards=1,
    ),
    "tiny-qwen3": dict(
        seed=20260103,
        config=dict(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=24,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=24,
        ),
        dtype="BF16",
        shards=1,
    ),
    "tiny-phi3": dict(
        seed=20260104,
        config=dict(
            architectures=["Phi3ForCausalLM"],
            model_type="phi3",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=24,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            # LongRoPE: one factor per rotary frequency (head_dim / 2 = 4), float32-exact so a GGUF keeps them
            rope_scaling=dict(
                type="longrope",
                short_factor=[1.0, 1.125, 1.25, 1.5],
                long_factor=[1.0, 2.0, 8.0, 24.0],
            ),
            original_max_position_embeddings=64,
            max_position_embeddings=4096,
            sliding_window=None,
            tie_word_embeddings=False,
            pad_token_id=2,  # transformers' Phi3Config default (32000) lies outside this vocabulary
        ),
        dtype="BF16",
        shards=1,
    ),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_tokenizer():
    """A byte-level BPE tokenizer with no merges: ids 0-2 special, 3 + b for byte b."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab |= {ch: len(SPECIAL_TOKENS) + b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def random_weights(cfg: dict, seed: int) -> dict[str, np.ndarray]:
    """Seeded weights; q/k of layer l = shared base + noise scaled by (1 - l/L)."""
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], len(SPECIAL_TOKENS) + 256
    L, H, H_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", D // H)

    def normal(*shape, std=1.0):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    base_q, base_k = normal(H * hd, D, std=2.0 / D**0.5), normal(H_kv * hd, D, std=2.0 / D**0.5)
    w = {"model.embed_tokens.weight": normal(V, D), "model.norm.weight": 1.0 + normal(D, std=0.1)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = normal(V, D, std=1.0 / D**0.5)
    for l in range(L):
        p, drift = f"model.layers.{l}.", 1.0 - l / L
        w |= {
            p + "input_layernorm.weight": 1.0 + normal(D, std=0.1),
            p + "self_attn.q_proj.weight": base_q + drift * normal(H * hd, D, std=2.0 / D**0.5),
            p + "self_attn.k_proj.weight": base_k + drift * normal(H_kv * hd, D, std=2.0 / D**0.5),
            p + "self_attn.v_proj.weight": normal(H_kv * hd, D, std=1.0 / D**0.5),
            p + "self_attn.o_proj.weight": normal(D, H * hd, std=0.5 / (H * hd) ** 0.5),
            p + "post_attention_layernorm.weight": 1.0 + normal(D, std=0.1),
            p + "mlp.gate_proj.weight": normal(F, D, std=1.0 / D**0.5),
            p + "mlp.up_proj.weight": normal(F, D, std=1.0 / D**0.5),
            p + "mlp.down_proj.weight": normal(D, F, std=0.5 / F**0.5),
        }
        if cfg["model_type"] == "qwen2" or cfg.get("attention_bias"):
            w |= {
                p + "self_attn.q_proj.bias": normal(H * hd, std=0.5),
                p + "self_attn.k_proj.bias": normal(H_kv * hd, std=0.5),
                p + "self_attn.v_proj.bias": normal(H_kv * hd, std=0.5),
            }
        if cfg.get("attention_bias"):  # Llama's and Qwen3's attention_bias covers o_proj too (Qwen2's never)
            w[p + "self_attn.o_proj.bias"] = normal(D, std=0.1)
        if cfg["model_type"] == "qwen3":  # per-head RMSNorm weights of q and k
            w |= {p + "self_attn.q_norm.weight": 1.0 + normal(hd, std=0.1),
                  p + "self_attn.k_norm.weight": 1.0 + normal(hd, std=0.1)}
        if cfg["model_type"] == "phi3":  # stored fused, as Phi-3 checkpoints are: q, k, v rows; gate, up rows
            # q and k at 1/√2 the scale: LongRoPE's attention factor (√2 here) multiplies every score by 2,
            # which would leave the model's logits twice as sensitive to rounding as the other tiny models'
            q, k = (w.pop(p + f"self_attn.{x}_proj.weight") * np.float32(PHI3_QK_SCALE) for x in "qk")
            w[p + "self_attn.qkv_proj.weight"] = np.concatenate([q, k, w.pop(p + "self_attn.v_proj.weight")])
            w[p + "mlp.gate_up_proj.weight"] = np.concatenate(
                [w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")])
    return w


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_weights(out: Path, weights: dict[str, np.ndarray], dtype: str, shards: int) -> None:
    if shards == 1:
        save(weights, out / "model.safetensors", dtype)
        return
    names = list(weights)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save({names[j]: weights[names[j]] for j in part}, out / shard, dtype)
        weight_map |= {names[j]: shard for j in part}
    total = sum(int(t.size) * (2 if dtype != "F32" else 4) for t in weights.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_tiny_checkpoint(name: str, out: Path) -> Path:
    """Write checkpoint `name` (a key of FAMILIES) into directory `out`."""
    spec = FAMILIES[name]
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(spec["config"], vocab_size=len(SPECIAL_TOKENS) + 256, hidden_act="silu",
               bos_token_id=None, eos_token_id=2,
               torch_dtype={"F32": "float32", "BF16": "bfloat16"}[spec["dtype"]])
    _write_json(out / "config.json", cfg)
    _write_json(out / "generation_config.json", {"eos_token_id": 2, "pad_token_id": 2})
    _write_weights(out, random_weights(cfg, spec["seed"]), spec["dtype"], spec["shards"])
    byte_level_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    _write_json(
        out / "tokenizer_config.json",
        {"chat_template": CHATML, "bos_token": None, "eos_token": "<|im_end|>", "add_bos_token": False,
         "pad_token": "<|im_end|>", "model_max_length": cfg["max_position_embeddings"]},
    )
    return out


def _same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.io.tiny", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    status = 0
    for name in FAMILIES:
        target = CHECKPOINTS / name
        with tempfile.TemporaryDirectory() as tmp:
            fresh = write_tiny_checkpoint(name, Path(tmp) / name)
            if args.check:
                same = target.is_dir() and _same_tree(fresh, target)
                print(f"{name}: {'identical' if same else 'DIFFERS from the generator'}")
                status |= 0 if same else 1
            else:
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(fresh, target)
                print(f"{name}: written to {target}")
    return status


if __name__ == "__main__":
    sys.exit(main())
