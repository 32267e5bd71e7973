"""The smallest trace `asl check` passes: one bundle case, method `full` (no pruning), built by hand.
minimal_trace() imports nothing from `reference`; only __main__ does, standing in for "your implementation"."""

import argparse
from pathlib import Path

import numpy as np

SHAPE = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
         "hidden_size", "intermediate_size", "vocab_size")


def layer_flops(m: dict, n: int) -> int:
    """Analytic FLOPs of one layer over n tokens (2 per multiply-add; docs/trace.md, "The FLOP cost model")."""
    D, F, d = m["hidden_size"], m["intermediate_size"], m["head_dim"]
    H, H_kv = m["num_attention_heads"], m["num_key_value_heads"]
    projections = 2 * n * D * (2 * H * d + 2 * H_kv * d)  # q, o (H·d each); k, v (H_kv·d each)
    attention = 2 * 2 * H * d * (n * (n + 1) // 2)  # q·k and p·v over the causal pairs
    mlp = 2 * n * 3 * D * F  # gate, up, down
    return projections + attention + mlp


def minimal_trace(inputs: dict, decisions: dict) -> tuple[dict, dict]:
    """A full run's trace and arrays, from a bundle's CASE.inputs.json and what the implementation decided."""
    model = {"name": inputs["model"]["name"], "sha256": inputs["model"]["sha256"]}
    model |= {k: decisions[k] for k in SHAPE}
    L, H_kv, d = model["num_hidden_layers"], model["num_key_value_heads"], model["head_dim"]
    N, dtype = len(inputs["prompt_ids"]), inputs["dtype"]
    bpe = {"float32": 4, "float64": 8}[dtype]
    layers = [{"layer": i, "prefill_tokens": N, "kv_tokens": [N] * H_kv, "flops": layer_flops(model, N),
               "scored": False, "union_size": None, "v": None, "ratio": None, "margin": None,
               "boundary_gap": None, "kv_boundary_gaps": None,
               "kept_tokens": None,  # every token goes on to the next layer
               "keep_ratio": None} for i in range(L)]  # (PyramidInfer's alone)
    kv_bytes = sum(2 * t * d * bpe for e in layers for t in e["kv_tokens"])  # keys and values
    kv_bytes_full = 2 * L * H_kv * N * d * bpe  # a full run's cache: the same number, for full
    trace = {
        "schema_version": 3,
        "method": "full",
        "params": inputs["params"],  # must equal the bundle's, every field
        "model": model,
        "dtype": dtype,
        "prompt_ids": inputs["prompt_ids"],
        "num_prompt_tokens": N,
        "select_layer": None,  # full selects nothing ...
        "kept_positions": None,  # ... so it keeps no subset
        "next_position": N,
        "generated_ids": [int(t) for t in decisions["generated_ids"]],
        "generated_gaps": [float(g) for g in decisions["generated_gaps"]],
        "notes": [],
        "layers": layers,
        "first_pass": None,
        "decode_compressions": None,  # PyramidInfer's alone
        "recomputed_at": None,  # a LongRoPE (Phi-3) generation past original_max_position_embeddings alone
        "totals": {"bytes_per_element": bpe, "kv_bytes": kv_bytes, "kv_bytes_full": kv_bytes_full,
                   "kv_fraction": kv_bytes / kv_bytes_full,
                   "prefill_flops": sum(e["flops"] for e in layers),
                   "prefill_flops_full": L * layer_flops(model, N)},
        "arrays_file": None,  # save_trace sets it to the .npz's name
    }
    arrays = {"logits": np.asarray(decisions["logits"], dtype=dtype)}  # (V,)
    arrays |= {f"step_logits/{t}": np.asarray(step, dtype=dtype)  # (V,): generated id t was chosen from these
               for t, step in enumerate(decisions["step_logits"][1:], start=1)}
    arrays |= {f"kv_positions/{i}/{g}": np.arange(N, dtype=np.int64)  # every prompt position is cached
               for i in range(L) for g in range(H_kv)}
    return trace, arrays


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write a minimal candidate trace for the bundle's tiny-llama-full.")
    parser.add_argument("bundle", type=Path, help="a bundle written by `asl golden --model tiny-llama`")
    parser.add_argument("out", type=Path, help="candidate directory to write tiny-llama-full.trace.json (+ .npz) into")
    args = parser.parse_args()

    from reference.asl import generate, params
    from reference.io import checkpoint, fetch
    from reference.oracle import bundle
    from reference.oracle import trace as trace_io

    inputs = bundle.read_inputs(args.bundle, "tiny-llama-full")
    # "your implementation" starts here: the reference runs the case ...
    weights = checkpoint.load_weights(fetch.resolve_model("tiny-llama"), inputs["dtype"])
    gen = generate.generate(weights, inputs["prompt_ids"], inputs["max_new_tokens"], inputs["eos_token_ids"],
                            method="full", params=params.Params(**inputs["params"]))
    decisions = {k: getattr(weights.config, k) for k in SHAPE}
    decisions |= {"logits": gen.prefill.logits, "generated_ids": gen.generated_ids,
                  "generated_gaps": gen.generated_gaps,
                  "step_logits": gen.step_logits}  # ... and ends here (step 0's logits are the prefill's)
    trace, arrays = minimal_trace(inputs, decisions)
    args.out.mkdir(parents=True, exist_ok=True)
    trace_io.save_trace(trace, arrays, args.out / "tiny-llama-full.trace.json", with_arrays=True)
    print(f"wrote {args.out / 'tiny-llama-full.trace.json'} (+ .npz)")
