"""Where the NumPy port's time goes, SmolLM2's shapes, float32: the numbers docs/benchmarks.md quotes.

    python benchmarks/port_breakdown.py [--tokens 4096] [--rounds 5] [--phases]

1. One layer's attention (9 query heads on 3 KV heads, head size 64, causal,
   N tokens, random inputs): the port on one thread, the port on every
   available core, and torch's scaled_dot_product_attention as the peer.
2. The MLP's GEMM (1024 x 576 @ 576 x 1536) with BLAS held at one thread,
   alone and on two threads at once: the port's GEMM rate per thread.
Each is timed `rounds` times in a block of its own, after one untimed run; the best time is shown.
3. With --phases (needs SmolLM2: `make smollm2`): `rounds` real prefills of N tokens of the
   passkey prompt on the port, split into its three phases per layer (projections and rope,
   attention, output projection and MLP), the thread time that sat idle at the end of each
   phase, waiting for the other threads to finish theirs, and how many KV heads' attention calls
   needed no per-row softmax shift (`KeyBounds.for_queries`). Each prefill is shown.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu.attention import flash_attention  # noqa: E402
from gpu.threads import available_cores, blas_threads, each  # noqa: E402


def best_of(candidates: dict, rounds: int) -> dict[str, float]:
    """Each candidate in a block of its own (after one untimed run): runs interleaved with torch's would
    meet its OpenMP threads still spinning after a call and lose cores to them."""
    best = {}
    for name, run in candidates.items():
        run()
        best[name] = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def single_threaded(run):
    def held():
        with blas_threads(1):
            return run()
    return held


def attention(n: int, rounds: int) -> None:
    B, G, hd = 3, 3, 64
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, G, n, hd), dtype=np.float32)
    k, v = rng.standard_normal((2, B, n, hd), dtype=np.float32)
    pos = np.arange(n)
    cores = available_cores()
    candidates = {
        "port, 1 thread": single_threaded(lambda: flash_attention(np, q, k, v, pos, pos, 128, 8192, 1)),
        f"port, {cores} threads": lambda: flash_attention(np, q, k, v, pos, pos, 128, 8192, cores),
    }
    try:
        import torch

        tq = torch.from_numpy(q.reshape(1, B * G, n, hd))
        tk, tv = (torch.from_numpy(np.repeat(x, G, axis=0)[None]) for x in (k, v))
        candidates[f"torch sdpa, {torch.get_num_threads()} threads"] = (
            lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True))
    except ImportError:
        print("torch not installed: no peer")
    print(f"one layer's attention, {n} tokens (best of {rounds} runs):")
    for name, seconds in best_of(candidates, rounds).items():
        print(f"  {name:>28}: {seconds:.3f} s")


def gemm(rounds: int) -> None:
    x, w = np.ones((1024, 576), np.float32), np.ones((1536, 576), np.float32)
    flops = 2 * 1024 * 576 * 1536
    best = best_of({"alone": single_threaded(lambda: x @ w.T), "pair": lambda: each(lambda _: x @ w.T, range(2), 2)},
                   rounds)
    alone, pair = best["alone"], best["pair"]
    print("the MLP's GEMM with BLAS at one thread:")
    print(f"  {'one thread alone':>28}: {flops / alone / 1e9:.0f} GFLOP/s")
    print(f"  {'two threads at once':>28}: {2 * flops / pair / 1e9:.0f} GFLOP/s in all")


def phases(n: int, rounds: int) -> None:
    # this folder's prefill benchmark: the same prompt and the same engine
    from prefill_smollm2 import port_engine, prompt_ids

    import gpu.attention
    import gpu.threads
    from reference.asl.methods import run_prefill
    from reference.io.fetch import resolve_model

    model_dir = resolve_model("smollm2")
    ids = prompt_ids(model_dir, n)
    engine = port_engine(model_dir)
    wall: dict[str, float] = {}
    idle = [0.0]
    quiet = [0, 0]  # KV heads whose attention call needs no per-row shift, of all calls' KV heads
    run_each, for_queries = gpu.threads.each, gpu.attention.KeyBounds.for_queries

    def counted_for_queries(self, *args):
        bounds = for_queries(self, *args)
        quiet[0] += int(bounds.quiet.sum())
        quiet[1] += len(bounds.quiet)
        return bounds

    def timed_each(work, items, threads):  # the thread time each call's pool spends outside `work`
        items = list(items)
        busy, lock = [0.0], threading.Lock()

        def timed(item):
            start = time.perf_counter()
            work(item)
            with lock:
                busy[0] += time.perf_counter() - start

        start = time.perf_counter()
        run_each(timed, items, threads)
        idle[0] += (time.perf_counter() - start) * min(threads, len(items)) - busy[0]

    def phase(name, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = method(*args, **kwargs)
            wall[name] = wall.get(name, 0.0) + time.perf_counter() - start
            return result
        return timed

    by_rows = engine.by_rows
    engine.by_rows = lambda T, work: phase(work.__name__, by_rows)(T, work)  # "project" and "finish" in layer()
    engine.attend = phase("attention", engine.attend)
    gpu.threads.each = gpu.attention.each = timed_each
    gpu.attention.KeyBounds.for_queries = counted_for_queries
    try:
        run_prefill(engine, ids[:64], "full")
        print(f"a full prefill of {n} tokens on the port, {engine.threads} threads, by phase (wall s):")
        for _ in range(rounds):
            wall.clear()
            idle[0], quiet[:] = 0.0, [0, 0]
            start = time.perf_counter()
            run_prefill(engine, ids, "full")
            total = time.perf_counter() - start
            print(f"  total {total:.2f}: projections {wall['project']:.2f}, attention {wall['attention']:.2f}, "
                  f"output projection + MLP {wall['finish']:.2f}; thread time idle at phase ends "
                  f"{idle[0]:.2f} s ({idle[0] / (total * engine.threads):.0%} of {engine.threads} threads' time); "
                  f"KV heads needing no shift: {quiet[0]} of {quiet[1]}")
    finally:
        gpu.threads.each = gpu.attention.each = run_each
        gpu.attention.KeyBounds.for_queries = for_queries


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--phases", action="store_true",
                        help="also time a real SmolLM2 prefill phase by phase (needs `make smollm2`)")
    args = parser.parse_args()
    print(f"numpy {np.__version__}, {available_cores()} cores, float32")
    attention(args.tokens, args.rounds)
    gemm(max(args.rounds, 20))
    if args.phases:
        phases(args.tokens, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
