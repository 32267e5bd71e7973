"""Prefill time and peak memory: the reference against transformers (sdpa), SmolLM2, float32.

    python benchmarks/prefill_smollm2.py [--tokens 1024 2048 4096] [--repeats 1]

Each (implementation, length) runs in its own subprocess, so peak memory
(ru_maxrss: weights, activations and the KV cache) belongs to that run alone.
The two implementations run on the same machine in the same invocation and are
reported as ratios. Prints the BLAS, dtype and thread counts used.
Needs the crosscheck extra (torch, transformers) and `asl fetch smollm2`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def prompt_ids(model_dir, n_tokens: int) -> list[int]:
    """Exactly n_tokens ids of the passkey haystack (real text, not random ids)."""
    from reference.prompts import passkey_prompt
    from reference.tokenizer import load_tokenizer

    ids = passkey_prompt(load_tokenizer(model_dir), n_tokens + 200, seed=0, chat=False).ids
    return ids[:n_tokens]


def run_reference(model_dir, ids, repeats: int) -> float:
    from reference.checkpoint import load_weights
    from reference.model import prefill

    weights = load_weights(model_dir, "float32")
    prefill(weights, ids[:64])  # warm-up: pages of the mapped weights, BLAS threads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        prefill(weights, ids)
        times.append(time.perf_counter() - start)
    return min(times)


def run_transformers(model_dir, ids, repeats: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    x = torch.tensor([ids])
    times = []
    with torch.inference_mode():
        model(x[:, :64], logits_to_keep=1)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, logits_to_keep=1)  # like the reference: logits of the last token only
            times.append(time.perf_counter() - start)
    return min(times)


def worker(impl: str, n_tokens: int, repeats: int) -> None:
    from reference.fetch import resolve_model

    model_dir = resolve_model("smollm2")
    ids = prompt_ids(model_dir, n_tokens)
    seconds = (run_reference if impl == "reference" else run_transformers)(model_dir, ids, repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"impl": impl, "tokens": len(ids), "seconds": seconds, "peak_mb": peak_mb}))


def environment() -> str:
    import numpy as np

    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"numpy {np.__version__} with {blas.get('name')} {blas.get('version')}"
        f" (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})",
    ]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        lines.append("torch not installed")
    lines.append("dtype: float32 for both; transformers attention: sdpa")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per point; the best is reported")
    parser.add_argument("--worker", choices=["reference", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tokens[0], args.repeats)
        return 0
    print(environment())
    print(f"{'tokens':>7} {'reference s':>12} {'transformers s':>15} {'time ratio':>11} {'ref peak MB':>12} {'tf peak MB':>11}")
    for n in args.tokens:
        row = {}
        for impl in ("reference", "transformers"):
            out = subprocess.run(
                [sys.executable, __file__, "--worker", impl, "--tokens", str(n), "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True,
            )
            row[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        r, t = row["reference"], row["transformers"]
        print(f"{r['tokens']:>7} {r['seconds']:>12.2f} {t['seconds']:>15.2f} {r['seconds'] / t['seconds']:>10.2f}x"
              f" {r['peak_mb']:>12.0f} {t['peak_mb']:>11.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
