"""Many methods, one prefill (issue 25): several methods together on one `SharedPrefill` against the same methods
one by one, SmolLM2, float32; the numbers docs/benchmarks.md quotes.

    python benchmarks/shared_prefill.py [--tokens 1024 4096] [--rounds 2] [--engine reference|port]
                                        [--methods full,snapkv,fastkv,gemfilter,asl,asl-2pass]
    python benchmarks/shared_prefill.py --eval [--tokens 1024] [--rounds 1] [--methods ...]
    python benchmarks/shared_prefill.py --memory    # docs/architecture.md's table: what sharing holds per token

1. Prefill only, in one process: per round, the methods one by one on the engine (each its own prefill, as
   before issue 25) and the same methods together in one `sharing` block, the two taking turns (A B, then
   B A in the next round) so both see the same machine; wall and CPU seconds, the best of the rounds, and
   their ratio. Beside it the analytic FLOP floor: the prefill FLOPs (`layer_flops`, `qk_flops`) of the
   layers the engine actually ran together over the same sum one by one, counted on the engine's calls.
   The remembered bytes are printed too (the memory that sharing holds at the end of the prompt).
2. --eval: whole processes, as a user runs them: `asl eval` of the passkey and niah_single tasks, 1 sample,
   --select-k 256 --kv-budget 256 --max-new-tokens 12, with every method in one process against one process
   per method (each loads the model again), taking turns the same way; the ratio of the wall times.
3. --memory: what the remembered layers hold per prompt token, from the shapes (per layer: the hidden states
   D × 4 bytes, keys and values 2 · H_kv · hd in the cache's dtype, the cached positions H_kv int64; once: the
   embeddings), for SmolLM2 on the reference and on a GPU and for Llama-3.1-8B on a GPU, at 8K and 128K tokens,
   how many of the 8B model's layers a 32 GB bound keeps at 128K; and, as the check of the formula, SmolLM2's
   bytes measured by `SharedPrefill.remembered_bytes` after a real shared prefill (needs SmolLM2).

Needs SmolLM2 (`asl fetch smollm2`). The machine may be shared: compare the ratios, which each round
measures on the same machine, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reference.asl.methods import layer_flops, qk_flops, run_prefill  # noqa: E402
from reference.asl.params import SMOLLM2_PARAMS  # noqa: E402
from reference.asl.sharing import SharedPrefill  # noqa: E402
from reference.eval.runner import method_params  # noqa: E402

SIX = ["full", "snapkv", "fastkv", "gemfilter", "asl", "asl-2pass"]
BUDGET = 256  # --kv-budget of the snapkv method (the measurement)


class Counted:
    """The engine, counting the prefill FLOPs of the layers (and GemFilter's q·k) it runs."""

    def __init__(self, engine):
        self.engine, self.config, self.flops = engine, engine.config, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def layer(self, i, x, positions, q_rows):
        self.flops += layer_flops(self.config, len(positions))
        return self.engine.layer(i, x, positions, q_rows)

    def gemfilter_scores(self, i, x, positions, kernel):
        self.flops += qk_flops(self.config, len(positions))
        return self.engine.gemfilter_scores(i, x, positions, kernel)


def make_engine(kind: str):
    import numpy as np

    from reference.asl.engine import ReferenceEngine
    from reference.io.checkpoint import load_weights
    from reference.io.fetch import resolve_model

    model_dir = resolve_model("smollm2")
    if kind == "reference":
        return ReferenceEngine(load_weights(model_dir, "float32"))
    from gpu.engine import PortEngine
    from gpu.loader import load_device_weights

    return PortEngine(load_device_weights(model_dir, np, "float32", progress=False)[0], np)


def params_for(method: str):
    from dataclasses import replace

    return method_params(method, replace(SMOLLM2_PARAMS, kv_budget=BUDGET))


def one_by_one(engine, ids, methods) -> tuple[float, float, int, list]:
    counted = Counted(engine)
    wall, cpu = time.perf_counter(), time.process_time()
    layers = []
    for method in methods:
        result = run_prefill(counted, ids, method, params_for(method))
        layers.append(result.select_layer)
        del result  # its caches go before the next method allocates its own
    return time.perf_counter() - wall, time.process_time() - cpu, counted.flops, layers


def together(engine, ids, methods) -> tuple[float, float, int, int]:
    counted = Counted(engine)
    shared = SharedPrefill(counted)
    wall, cpu = time.perf_counter(), time.process_time()
    with shared.sharing(ids):
        for method in methods:
            result = run_prefill(shared, ids, method, params_for(method))
            del result
        held = shared.remembered_bytes
    return time.perf_counter() - wall, time.process_time() - cpu, counted.flops, held


def prefill_benchmark(tokens: list[int], rounds: int, methods: list[str], kind: str) -> None:
    from reference.eval.tasks import passkey_ids
    from reference.io.fetch import resolve_model

    model_dir = resolve_model("smollm2")
    engine = make_engine(kind)
    print(f"{kind} engine on NumPy; methods {','.join(methods)}; {SMOLLM2_PARAMS.select_k=}, kv-budget {BUDGET} "
          f"(snapkv); best of {rounds} rounds, the two modes taking turns")
    print(f"{'tokens':>7} {'alone s':>8} {'shared s':>9} {'ratio':>6} {'alone cpu':>10} {'shared cpu':>11} "
          f"{'ratio':>6} "
          f"{'FLOP floor':>11} {'held MiB':>9}  selection layers")
    for n in tokens:
        ids = passkey_ids(model_dir, n)
        run_prefill(engine, ids[:64], "full")  # warm-up: mapped weights, BLAS threads
        best = {"alone": (float("inf"),) * 2, "shared": (float("inf"),) * 2}
        for r in range(rounds):
            for mode in (("alone", "shared") if r % 2 == 0 else ("shared", "alone")):
                if mode == "alone":
                    wall, cpu, flops_alone, layers = one_by_one(engine, ids, methods)
                else:
                    wall, cpu, flops_shared, held = together(engine, ids, methods)
                best[mode] = (min(best[mode][0], wall), min(best[mode][1], cpu))
        (aw, ac), (sw, sc) = best["alone"], best["shared"]
        print(f"{len(ids):>7} {aw:>8.1f} {sw:>9.1f} {sw / aw:>6.2f} {ac:>10.1f} {sc:>11.1f} {sc / ac:>6.2f} "
              f"{flops_shared / flops_alone:>11.2f} {held / 2**20:>9.0f}  {dict(zip(methods, layers))}", flush=True)


def asl_eval(methods: list[str], n: int, out: Path) -> float:
    command = [sys.executable, "-m", "reference", "eval", "--model", "smollm2", "--tasks", "passkey,niah_single",
               "--lengths", str(n), "--samples", "1", "--methods", ",".join(methods), "--select-k", "256",
               "--kv-budget", str(BUDGET), "--max-new-tokens", "12", "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    return seconds


def eval_benchmark(tokens: list[int], rounds: int, methods: list[str]) -> None:
    import json

    print(f"whole processes: `asl eval` of passkey,niah_single, 1 sample, methods {','.join(methods)}, "
          f"select-k 256, kv-budget {BUDGET}, 12 new tokens; the two modes taking turns, {rounds} round(s)")
    print(f"{'tokens':>7} {'round':>6} {'one by one s':>13} {'together s':>11} {'ratio':>6}  rows equal")
    for n in tokens:
        for r in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                seconds = {}
                for mode in (("alone", "together") if r % 2 == 0 else ("together", "alone")):
                    if mode == "alone":
                        seconds[mode] = sum(asl_eval([m], n, Path(tmp) / f"alone-{m}") for m in methods)
                    else:
                        seconds[mode] = asl_eval(methods, n, Path(tmp) / "together")
                rows = lambda p: sorted((json.loads(line) for line in (p / "results.jsonl").read_text().splitlines()),
                                        key=lambda d: (d["task"], d["method"]))
                strip = lambda rs: [{k: v for k, v in d.items() if not k.endswith("_seconds")} for d in rs]
                alone = sorted(sum((rows(Path(tmp) / f"alone-{m}") for m in methods), []),
                               key=lambda d: (d["task"], d["method"]))
                same = strip(alone) == strip(rows(Path(tmp) / "together"))
                print(f"{n:>7} {r:>6} {seconds['alone']:>13.1f} {seconds['together']:>11.1f} "
                      f"{seconds['together'] / seconds['alone']:>6.2f}  {same}", flush=True)


def bytes_per_token(L: int, D: int, H_kv: int, hd: int, cache_bytes: int) -> int:
    """What the remembered unpruned layers hold per prompt token (the window's queries, fixed per layer, aside)."""
    per_layer = D * 4 + 2 * H_kv * hd * cache_bytes + H_kv * 8  # hidden states (float32), K and V, positions
    return L * per_layer + D * 4  # + the embeddings, once


def memory_table() -> None:
    from gpu.selfcheck import LLAMA_31_8B
    from reference.io.checkpoint import load_weights
    from reference.io.fetch import resolve_model

    smol = load_weights(resolve_model("smollm2"), "float32")
    c = smol.config
    smol_shape = (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.head_dim)
    llama = LLAMA_31_8B
    rows = [("SmolLM2-135M, reference or NumPy port, float32", smol_shape, 4),
            ("SmolLM2-135M, port on a GPU (float16 cache)", smol_shape, 2),
            ("Llama-3.1-8B, port on a GPU (float16 cache)", (llama["num_hidden_layers"], llama["hidden_size"],
                                                              llama["num_key_value_heads"], llama["head_dim"]), 2)]
    print(f"{'model, engine':<50} {'per token':>10} {'8K tokens':>10} {'128K tokens':>12}")
    for name, shape, cache_bytes in rows:
        b = bytes_per_token(*shape, cache_bytes)
        print(f"{name:<50} {b / 2**10:>6.1f} KiB {b * 8192 / 2**30:>6.2f} GiB {b * 131072 / 2**30:>8.1f} GiB")
    L, D, H_kv, hd = rows[2][1]
    n, bound = 131072, 32e9  # half the ~64 GB an 80 GB GPU has free after the 8B model's weights
    per_layer = n * (bytes_per_token(1, D, H_kv, hd, 2) - D * 4)
    print(f"Llama-3.1-8B at 128K under a 32 GB bound: {int((bound - n * D * 4) // per_layer)} of {L} layers shared")

    # the formula against what a real shared prefill holds (SmolLM2, reference, float32; the 64-row queries included)
    from reference.asl.engine import ReferenceEngine
    from reference.asl.sharing import QUERY_ROWS
    from reference.eval.tasks import passkey_ids

    ids = passkey_ids(resolve_model("smollm2"), 1024, 0)
    shared = SharedPrefill(ReferenceEngine(smol))
    with shared.sharing(ids):
        run_prefill(shared, ids, "full", None)
        held = shared.remembered_bytes
    queries = c.num_hidden_layers * c.num_attention_heads * QUERY_ROWS * c.head_dim * 4
    formula = len(ids) * bytes_per_token(*smol_shape, 4) + queries
    print(f"SmolLM2, {len(ids)} tokens: measured {held / 2**20:.1f} MiB held, the formula {formula / 2**20:.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default=",".join(SIX))
    parser.add_argument("--engine", choices=("reference", "port"), default="reference")
    parser.add_argument("--eval", action="store_true", help="whole `asl eval` processes instead")
    parser.add_argument("--memory", action="store_true", help="what sharing holds per token (docs/architecture.md)")
    args = parser.parse_args()
    if args.memory:
        memory_table()
        return 0
    methods = [m for m in args.methods.split(",") if m]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    if args.eval:
        eval_benchmark(args.tokens, args.rounds, methods)
    else:
        prefill_benchmark(args.tokens, args.rounds, methods, args.engine)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
