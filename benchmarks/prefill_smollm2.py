"""Prefill time and peak memory: the reference and the port (NumPy) against transformers (sdpa), SmolLM2, float32.

    python benchmarks/prefill_smollm2.py [--tokens 1024 2048 4096] [--repeats 2] [--rounds 1] [--impls reference port transformers]
    python benchmarks/prefill_smollm2.py --asl [--tokens 1024 4096] [--repeats 5]   # the port: ASL vs full, time vs FLOPs saved

Each (implementation, length) runs in its own subprocess, so peak memory
(ru_maxrss: weights, activations and the KV cache) belongs to that run alone.
The implementations run on the same machine in the same invocation and are
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
    from reference.eval.tasks import demo_passkey
    from reference.io.tokenizer import load_tokenizer

    ids = demo_passkey(load_tokenizer(model_dir), n_tokens + 200, chat=False).ids
    return ids[:n_tokens]


def run_reference(model_dir, ids, repeats: int) -> float:
    from reference.io.checkpoint import load_weights
    from reference.model.transformer import prefill

    weights = load_weights(model_dir, "float32")
    prefill(weights, ids[:64])  # warm-up: pages of the mapped weights, BLAS threads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        prefill(weights, ids)
        times.append(time.perf_counter() - start)
    return min(times)


def port_engine(model_dir):
    """The port on NumPy with float32 weights, as every port benchmark here runs it."""
    import numpy as np

    from gpu.engine import PortEngine
    from gpu.loader import load_device_weights

    return PortEngine(load_device_weights(model_dir, np, "float32", progress=False)[0], np)


def run_port(model_dir, ids, repeats: int) -> float:
    from reference.asl.methods import run_prefill

    engine = port_engine(model_dir)
    run_prefill(engine, ids[:64], "full")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_prefill(engine, ids, "full")  # not kept: the next run's peak memory is its own
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
    from reference.io.fetch import resolve_model

    model_dir = resolve_model("smollm2")
    ids = prompt_ids(model_dir, n_tokens)
    seconds = {"reference": run_reference, "port": run_port, "transformers": run_transformers}[impl](model_dir, ids, repeats)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"impl": impl, "tokens": len(ids), "seconds": seconds, "peak_mb": peak_mb}))


def prefill_gflop(n_tokens: int) -> float:
    """The analytic prefill FLOPs of a full SmolLM2 run (reference.asl.methods.layer_flops), in GFLOP."""
    from reference.asl.methods import layer_flops
    from reference.io.fetch import resolve_model
    from reference.model.config import load_config

    cfg = load_config(resolve_model("smollm2"))
    return cfg.num_hidden_layers * layer_flops(cfg, n_tokens) / 1e9


def gemm_gflops(rounds: int = 20) -> dict[str, float]:
    """A plain float32 GEMM of the model's MLP shape (4096 x 576 @ 576 x 1536): NumPy's BLAS and, when
    installed, torch's (the port's GEMMs are NumPy's, transformers' are torch's); the two take turns,
    `rounds` times each, and the best of each is reported."""
    import numpy as np

    a, b = np.ones((4096, 576), np.float32), np.ones((576, 1536), np.float32)
    products = {"numpy": lambda: a @ b}
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        products["torch"] = lambda: ta @ tb
    except ImportError:
        pass
    best = dict.fromkeys(products, float("inf"))
    for _ in range(rounds):
        for name, product in products.items():
            start = time.perf_counter()
            product()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 2 * 4096 * 576 * 1536 / seconds / 1e9 for name, seconds in best.items()}


def asl_vs_full(tokens: list[int], repeats: int) -> int:
    """On the port: does ASL's prefill time saving follow the trace's FLOP estimate?
    One engine; full and asl run in adjacent pairs, `repeats` pairs, and the saving is the median of the
    pairs' savings (the machine's speed drifts between minutes; a pair sees the same machine)."""
    import statistics

    from reference.asl.methods import run_prefill
    from reference.asl.params import SMOLLM2_PARAMS
    from reference.eval.tasks import passkey_ids
    from reference.io.fetch import resolve_model

    model_dir = resolve_model("smollm2")
    params = SMOLLM2_PARAMS
    engine = port_engine(model_dir)
    print(f"port on NumPy, {engine.threads} threads; {params}; median of {repeats} pairs")
    layer_seconds = []  # every engine.layer call of the current run: the rest of a run is ASL's own work
    layer = engine.layer

    def timed_layer(*args, **kwargs):
        start = time.perf_counter()
        out = layer(*args, **kwargs)
        layer_seconds.append(time.perf_counter() - start)
        return out

    engine.layer = timed_layer
    print(f"{'tokens':>7} {'full s':>8} {'asl s':>8} {'layer':>6} {'time saved':>11} {'(pairs)':>15} {'FLOPs saved':>12} "
          f"{'ratio':>6} {'asl between layers s':>21} {'layers from the selection on s (full / asl)':>44}")
    for n in tokens:
        ids = passkey_ids(model_dir, n)
        run_prefill(engine, ids[:64], "full")  # warm-up
        seconds, result, between, tail = {"full": [], "asl": []}, {}, [], {"full": [], "asl": []}
        for _ in range(repeats):
            for method in ("full", "asl"):
                result[method] = None  # the previous run's caches go before this run allocates its own
                layer_seconds = []
                start = time.perf_counter()
                result[method] = run_prefill(engine, ids, method, params)
                seconds[method].append(time.perf_counter() - start)
                tail[method].append(layer_seconds)
                if method == "asl":
                    between.append(seconds["asl"][-1] - sum(layer_seconds))
        chosen = result["asl"].select_layer
        tail_s = {m: statistics.median(sum(t[chosen or 0:]) for t in tail[m]) for m in tail}
        savings = [1 - a / f for f, a in zip(seconds["full"], seconds["asl"])]
        flops = {m: sum(r.flops for r in (res.first_pass or []) + res.layers) for m, res in result.items()}
        time_saved, flops_saved = statistics.median(savings), 1 - flops["asl"] / flops["full"]
        pairs = f"{min(savings):.0%}..{max(savings):.0%}"
        print(f"{len(ids):>7} {statistics.median(seconds['full']):>8.2f} {statistics.median(seconds['asl']):>8.2f} "
              f"{str(result['asl'].select_layer):>6} {time_saved:>10.1%} {pairs:>15} {flops_saved:>11.1%} "
              f"{time_saved / flops_saved if flops_saved else float('nan'):>6.2f} {statistics.median(between):>21.3f} "
              f"{tail_s['full']:>35.2f} / {tail_s['asl']:.2f}", flush=True)
    return 0


def environment() -> str:
    import numpy as np

    from gpu.threads import available_cores

    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    lines = [
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        f"numpy {np.__version__} with {blas.get('name')} {blas.get('version')}"
        f" (OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})",
        f"reference: BLAS threads as BLAS chooses; port: {available_cores()} threads of its own, BLAS held at 1",
    ]
    try:
        import torch

        lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        lines.append("torch not installed")
    lines.append("dtype: float32 for all; transformers attention: sdpa")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs per point, the best reported (torch's first run at a new length is slow)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="times every implementation runs, in turns; the best time of each is reported")
    parser.add_argument("--impls", nargs="+", default=["reference", "port", "transformers"],
                        choices=["reference", "port", "transformers"], help="implementations to time (transformers is the peer)")
    parser.add_argument("--asl", action="store_true", help="the port's ASL vs full instead (passkey prompt)")
    parser.add_argument("--worker", choices=["reference", "port", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tokens[0], args.repeats)
        return 0
    print(environment())
    if args.asl:
        return asl_vs_full(args.tokens, max(args.repeats, 5))
    gemm = gemm_gflops()
    print("plain float32 GEMM (4096x576 @ 576x1536): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in gemm.items()))
    impls = [i for i in args.impls if i != "transformers"] + ["transformers"]
    header = " ".join(f"{i + ' s':>15} {'x tf':>6} {'GFLOP/s':>8} {'peak MB':>8}" for i in impls)
    print(f"{'tokens':>7} {header}")
    for n in args.tokens:
        row, ratios = {}, []
        for _ in range(args.rounds):  # implementations take turns, so a slow spell of the machine hits them all
            this_round = {}
            for impl in impls:
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", impl, "--tokens", str(n), "--repeats", str(args.repeats)],
                    capture_output=True, text=True, check=True,
                )
                this_round[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                best = row.setdefault(impl, this_round[impl])
                best["seconds"] = min(best["seconds"], this_round[impl]["seconds"])
                best["peak_mb"] = max(best["peak_mb"], this_round[impl]["peak_mb"])
            ratios.append({i: this_round[i]["seconds"] / this_round["transformers"]["seconds"] for i in impls})
        peer, work = row["transformers"]["seconds"], prefill_gflop(n)
        cells = " ".join(f"{row[i]['seconds']:>15.2f} {row[i]['seconds'] / peer:>5.2f}x {work / row[i]['seconds']:>8.0f} "
                         f"{row[i]['peak_mb']:>8.0f}" for i in impls)
        print(f"{n:>7} {cells}", flush=True)
        if args.rounds > 1:
            spread = ", ".join(f"{i} {min(r[i] for r in ratios):.2f}-{max(r[i] for r in ratios):.2f}x"
                               for i in impls if i != "transformers")
            print(f"{'':>7} time ratio vs transformers within each round: {spread}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
