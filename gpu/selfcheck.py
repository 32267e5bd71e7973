"""The prepared device check: agreement, goldens and a full-size benchmark in one go.

    python -m gpu.selfcheck --out OUT                      # on a GPU machine: CuPy, Llama-3.1-8B shapes
    python -m gpu.selfcheck --backend numpy --small --out OUT --skip-pytest   # its CPU half (run by the tests)

(docs/gpu.md gives the device command: the wheels of what the GPU image lacks first, then this.)
Steps, each written to OUT as it finishes (so a run cut short still reports):
1. environment: device, driver, CUDA and CuPy versions, numpy, torch;
2. agreement: the device variants of tests/test_port_agreement.py under pytest
   (hypothesis, random tiny models), the goldens left to step 3;
3. goldens: every golden case on the port at its weight dtype, judged by
   reference/oracle/conformance.py (once: step 2 leaves them out);
3b. sharing: every method on one `SharedPrefill` of the port (reference/asl/sharing.py), in both orders,
   against the same method alone, on tiny-llama and tiny-qwen3: generated ids, every step's logits and every cached position
   identical bit for bit, the layers served counted, and the memory bound read from the device;
4. benchmark: a randomly initialised Llama-3.1-8B-shaped model (weights made on
   the device; --small: a small shape): the rate of the port's float16 linear
   layer against a float16 GEMM, then at each of --lengths, shortest first,
   `full` and ASL's one-shot selection (forced at layer 15 with FastKV when
   random weights never fire the criterion at a short probe), prefill seconds,
   decode ms/token, peak memory, achieved TFLOP/s against the GEMM rate, and,
   when torch is importable, PyTorch SDPA prefill of the same shapes as the peer.
   Each length's cost is predicted from those before it (a·n + b·n², fitted to
   the last two; from one, all of it ∝ n² as attention's is) and a length
   that would end past --budget-s is skipped, not started.
OUT/results.json holds every number, rewritten as each lands; OUT/gpu-results.md the report for
docs/gpu-results.md.

(Length: the whole device check is one script, so that one short command runs it on a machine that has nothing else.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from gpu.backend import gemm_ex_status, get_xp, is_cupy
from gpu.engine import PortEngine
from gpu.loader import load_device_weights, random_device_weights
from reference.asl.generate import generate
from reference.asl.params import Params
from reference.model.config import parse_config
from reference.model.rope import inverse_frequencies
from reference.oracle.conformance import TOLERANCES, compare
from reference.asl.params import METHODS
from reference.asl.sharing import SharedPrefill, available_bytes
from reference.io.fetch import resolve_model
from reference.oracle.goldens import BASE, default_cases, run_case
from reference.oracle.trace import make_trace
from reference.oracle.verdicts import VERDICTS

LLAMA_31_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=131072, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)
SMALL = dict(
    model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=4096, tie_word_embeddings=False,
)
SMALL_ASL_PARAMS = dict(tau=0.3, l_min=4, l_obs=3, window=16, kernel=7, select_k=128, select_layer=4)


class Report:
    """Collects results and rewrites OUT/results.json after every step."""

    def __init__(self, out: Path):
        self.out, self.data, self.start = out, {}, time.perf_counter()
        out.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def write_markdown(self) -> None:
        """OUT/gpu-results.md from what has landed so far (rewritten with every result: a killed run keeps it)."""
        try:
            text = markdown(self.data)
        except Exception as e:  # a report that cannot be rendered must not stop the check
            text = f"# Device check results\n\nThe report could not be rendered ({type(e).__name__}: {e}); see results.json.\n"
        (self.out / "gpu-results.md").write_text(text)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        self.write_markdown()
        print(f"[{self.elapsed():6.1f} s] {key}: {json.dumps(value, default=str)[:300]}", flush=True)


def sync(xp) -> None:
    if xp.__name__ == "cupy":
        xp.cuda.Device().synchronize()


def environment(xp) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
           "backend": xp.__name__, "command": " ".join(sys.argv)}
    if xp.__name__ == "cupy":
        rt = xp.cuda.runtime
        props = rt.getDeviceProperties(0)
        env |= {"device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
                "device_memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
                "driver": rt.driverGetVersion(), "cuda_runtime": rt.runtimeGetVersion(), "cupy": xp.__version__,
                "CUPY_TF32": os.environ.get("CUPY_TF32", "0"),
                "attention_gemms": "2-D per KV head, float32 operands: "
                                   + ("TF32 tensor cores" if os.environ.get("CUPY_TF32", "0") != "0" else "FP32"),
                "linear_gemms": "float16 operands, float32 accumulation and output (path: linear_gemm_path)"}
    else:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        env |= {"device": f"CPU ({os.cpu_count()} cores)", "blas": f"{blas.get('name')} {blas.get('version')}"}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = bool(torch.cuda.is_available())
    except ImportError:
        env["torch"] = None
    return env


AGREEMENT_SELECTION = "cupy and not goldens"  # the device variants; the NumPy ones run in the suite, the goldens in step 3
AGREEMENT_FILES = ("test_port_agreement.py", "test_cupy_namespace.py")


def run_agreement_tests(report: Report, timeout_s: float) -> None:
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", AGREEMENT_SELECTION,
           *(str(root / "tests" / name) for name in AGREEMENT_FILES)]
    env = dict(os.environ, CUPY_TF32="0")  # the agreement tolerances are float32's; TF32 rounds operands to 10 bits
    try:
        done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s, env=env)
        (report.out / "agreement.log").write_text(done.stdout + done.stderr)
        report.put("agreement", {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1:]})
    except subprocess.TimeoutExpired as e:
        (report.out / "agreement.log").write_text(str(e.stdout or ""))
        report.put("agreement", {"returncode": None, "summary": [f"timed out after {timeout_s:.0f} s"]})


GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "goldens"  # a check of the repository, not a library


def run_goldens(report: Report, xp, weight_dtype: str) -> None:
    def engine(model_dir):
        return PortEngine(load_device_weights(model_dir, xp, weight_dtype, progress=False)[0], xp)

    verdicts = {}
    for case in default_cases():
        golden = json.loads((GOLDEN_DIR / f"{case.name}.json").read_text())  # the repository's goldens
        verdict, findings = compare(golden["expected"], run_case(case, engine)["expected"], TOLERANCES[weight_dtype])
        verdicts[case.name] = verdict if not findings else f"{verdict}: {findings[0].field}: {findings[0].message}"
    counts = {v: sum(1 for x in verdicts.values() if x.split(":")[0] == v) for v in VERDICTS}
    report.put("goldens", {"weight_dtype": weight_dtype, "counts": counts, "cases": verdicts})


SHARED_MODELS = ("tiny-llama", "tiny-qwen3")  # the second: q/k norms and head_dim ≠ D / H on the device


def _same_run(a, b, engine) -> bool:
    """Bit for bit: generated ids, every step's logits, and every layer's cached positions after prefill."""
    return (a.generated_ids == b.generated_ids and len(a.step_logits) == len(b.step_logits)
            and all(np.array_equal(x, y) for x, y in zip(a.step_logits, b.step_logits))
            and all(np.array_equal(p, q) for c, d in zip(a.prefill.cache, b.prefill.cache)
                    for p, q in zip(engine.positions(c), engine.positions(d))))


def run_sharing(report: Report, xp, weight_dtype: str) -> None:
    """Many methods, one prefill on this backend: each method on a SharedPrefill is the method alone."""
    rows = {}
    for model in SHARED_MODELS:
        engine = PortEngine(load_device_weights(resolve_model(model), xp, weight_dtype, progress=False)[0], xp)
        ids = np.random.default_rng(25).integers(3, 259, 150).tolist()
        params = {m: Params() if m == "pyramidinfer" else Params(**(BASE.to_dict() | {"kv_budget": 40}))
                  if m == "snapkv" else BASE for m in METHODS}
        alone = {m: generate(engine, ids, 4, (), method=m, params=params[m]) for m in METHODS}
        different, served = set(), 0
        for order in (METHODS, METHODS[::-1]):  # whichever method runs a layer first computes it: both orders
            shared = SharedPrefill(engine)
            with shared.sharing(ids):
                together = {m: generate(shared, ids, 4, (), method=m, params=params[m]) for m in order}
                held = shared.remembered_bytes
            different |= {m for m in METHODS if not _same_run(alone[m], together[m], engine)}
            served += shared.layers_served
        rows[model] = {"identical": not different, "different": sorted(different), "layers_served": served,
                       "held_mib": round(held / 2**20, 3), "bound_gib": round(0.5 * available_bytes(engine) / 2**30, 2)}
    report.put("sharing", rows)


def gemm_tflops(xp, n: int, dtype) -> float:
    a = xp.ones((n, n), dtype=dtype)
    b = xp.ones((n, n), dtype=dtype)
    a @ b
    sync(xp)
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        a @ b
    sync(xp)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_memory_reset(xp) -> None:
    if xp.__name__ == "cupy":
        xp.get_default_memory_pool().free_all_blocks()


def peak_memory_gib(xp) -> float:
    if xp.__name__ == "cupy":
        return xp.get_default_memory_pool().total_bytes() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB


def linear_tflops(xp, weights, n_rows: int) -> float:
    """The port's linear layer (PortEngine.linear: weight-dtype operands, float32 out) on the MLP's up projection."""
    engine = PortEngine(weights, xp)
    w = weights.layers[0].w_up
    x = xp.ones((n_rows, w.shape[1]), dtype=np.float32)
    engine.linear(x, w)
    sync(xp)
    start = time.perf_counter()
    reps = 5
    for _ in range(reps):
        engine.linear(x, w)
    sync(xp)
    return 2 * n_rows * w.shape[0] * w.shape[1] * reps / (time.perf_counter() - start) / 1e12


def predicted_seconds(done: list[tuple[int, float]], n: int) -> float | None:
    """A length's cost from the lengths measured before it: a·n + b·n² through the last two (a, b >= 0),
    or all ∝ n² (attention's share, an upper bound) from one; None before any."""
    if not done:
        return None
    (n1, t1) = done[-1]
    if len(done) == 1:
        return t1 * (n / n1) ** 2
    (n0, t0) = done[-2]
    b = max(0.0, (t1 / n1 - t0 / n0) / (n1 - n0))
    a = max(0.0, t1 / n1 - b * n1)
    return a * n + b * n * n


def out_of_memory(e: Exception) -> bool:
    text = str(e).lower()
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in text or "alloc_failed" in text


def port_point(xp, weights, cfg, n_tokens: int, method: str, params, decode_tokens: int, blocks=None) -> dict:
    ids = np.random.default_rng(n_tokens).integers(0, cfg.vocab_size, n_tokens)
    engine = PortEngine(weights, xp, **(blocks or {}))
    peak_memory_reset(xp)
    sync(xp)
    start = time.perf_counter()
    gen = generate(engine, ids, 0, (), method=method, params=params)
    sync(xp)
    prefill_s = time.perf_counter() - start
    trace, _ = make_trace(gen, model_name="random", model_sha256="", config=cfg, dtype="float32")
    logits, cache, position = gen.prefill.logits, gen.prefill.cache, gen.prefill.next_position
    start = time.perf_counter()
    for t in range(decode_tokens):
        logits, cache = engine.decode(cache, int(np.argmax(logits)), position + t)
    sync(xp)
    decode_ms = 1000 * (time.perf_counter() - start) / max(decode_tokens, 1)
    return {"method": method, "tokens": n_tokens, "prefill_s": round(prefill_s, 3), "decode_ms_per_token": round(decode_ms, 2),
            "peak_memory_gib": round(peak_memory_gib(xp), 2), "select_layer": trace["select_layer"],
            "kept": None if trace["kept_positions"] is None else len(trace["kept_positions"]),
            "prefill_flops": trace["totals"]["prefill_flops"], "kv_fraction": round(trace["totals"]["kv_fraction"], 4),
            "tflops": round(trace["totals"]["prefill_flops"] / prefill_s / 1e12, 2)}


def torch_point(cfg, n_tokens: int, on_gpu: bool) -> dict | None:
    """PyTorch peer: the same shapes (one layer's random weights reused for every layer), SDPA attention."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if on_gpu and not torch.cuda.is_available():
        return None
    dev, dt = ("cuda", torch.float16) if on_gpu else ("cpu", torch.float32)
    D, Fm, H, H_kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) / shape[-1] ** 0.5).to(dt)

    wq, wk, wv, wo = rand(H * hd, D), rand(H_kv * hd, D), rand(H_kv * hd, D), rand(D, H * hd)
    wg, wu, wd = rand(Fm, D), rand(Fm, D), rand(D, Fm)
    inv = torch.tensor(inverse_frequencies(cfg), device=dev)
    ang = torch.arange(n_tokens, device=dev, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)

    def rope(x):
        n = x.shape[1]
        x1, x2 = x.chunk(2, -1)
        return x * cos[:n] + torch.cat([-x2, x1], -1) * sin[:n]

    def norm(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps).to(dt)

    def forward(x):
        n = x.shape[0]
        for _ in range(cfg.num_hidden_layers):
            h = norm(x)
            q = rope((h @ wq.T).view(n, H, hd).transpose(0, 1))
            k = rope((h @ wk.T).view(n, H_kv, hd).transpose(0, 1))
            v = (h @ wv.T).view(n, H_kv, hd).transpose(0, 1)
            a = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0]
            x = x + a.transpose(0, 1).reshape(n, H * hd) @ wo.T
            h = norm(x)
            x = x + (F.silu(h @ wg.T) * (h @ wu.T)) @ wd.T
        return x

    x = torch.randn(n_tokens, D, generator=g, device=dev, dtype=torch.float32).to(dt)
    with torch.inference_mode():
        forward(x[:64] if n_tokens > 64 else x)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        forward(x)
        if on_gpu:
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    if on_gpu:
        del x, wq, wk, wv, wo, wg, wu, wd
        torch.cuda.empty_cache()  # and torch's cache gives its back before the next length
    return {"tokens": n_tokens, "prefill_s": round(seconds, 3), "peak_memory_gib": None if peak is None else round(peak, 2),
            "dtype": str(dt)}


def run_benchmark(report: Report, xp, small: bool, lengths: list[int], weight_dtype: str, budget_s: float,
                  blocks: dict | None = None) -> None:
    """blocks: PortEngine's block_q / block_k where given (the engine's defaults otherwise)."""
    cfg = parse_config(SMALL if small else LLAMA_31_8B)
    weights = random_device_weights(cfg, xp, weight_dtype)
    asl = Params(**SMALL_ASL_PARAMS) if small else Params()  # the authors' defaults at full size
    on_gpu = xp.__name__ == "cupy"
    gemm = gemm_tflops(xp, 8192 if on_gpu else 1024, np.float16 if on_gpu else np.float32)
    report.put("gemm_tflops", {"dtype": "float16" if on_gpu else "float32", "tflops": round(gemm, 2)})
    linear = linear_tflops(xp, weights, 4096 if on_gpu else 256)
    report.put("linear", {"weight_dtype": weight_dtype, "tflops": round(linear, 2),
                          "fraction_of_gemm_rate": round(linear / gemm, 3)})
    points, done, forced = [], [], None  # done: (tokens, seconds) of every length measured
    try:  # torch's CUDA start-up, once, outside every timing (it would pollute the first length's cost)
        torch_point(cfg, 128, on_gpu)
    except Exception as e:
        report.put("torch_warm_up", f"{type(e).__name__}: {str(e)[:200]}")
    for n in sorted(lengths):
        guess = predicted_seconds(done, n)
        if report.elapsed() + (guess or 0.0) > budget_s:
            why = f"time budget of {budget_s:.0f} s: " + (f"predicted {guess:.0f} s, {budget_s - report.elapsed():.0f} s left"
                                                         if guess is not None else "reached")
            points.append({"tokens": n, "skipped": why})
            report.put("benchmark", points)
            continue
        point = {"tokens": n}
        points.append(point)
        try:
            if forced is None:  # does the criterion fire on random weights? asked once, on a short prompt, untimed
                probe = port_point(xp, weights, cfg, min(n, 2048), "asl", asl, 0, blocks)  # (it also compiles the kernels)
                forced = probe["select_layer"] is None
                report.put("asl_probe", {"tokens": min(n, 2048), "select_layer": probe["select_layer"], "forced": forced})
            label = f"asl (forced at layer {asl.select_layer} via fastkv)" if forced else "asl"
            start = time.perf_counter()
            point["full"] = port_point(xp, weights, cfg, n, "full", asl, 4, blocks)
            report.put("benchmark", points)
            point["asl"] = port_point(xp, weights, cfg, n, "fastkv" if forced else "asl", asl, 4, blocks) | {"label": label}
            report.put("benchmark", points)
        except Exception as e:
            if not out_of_memory(e):
                raise
            point["skipped"] = f"out of device memory ({type(e).__name__})"
            report.put("benchmark", points)
            peak_memory_reset(xp)
            continue
        peak_memory_reset(xp)  # CuPy's pool gives its blocks back before torch allocates
        try:
            peer = torch_point(cfg, n, on_gpu)
        except Exception as e:  # the peer's failure (its memory, say) is its row's, not the port's
            peer = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            _torch_free_cache()
        full, one_shot = point["full"], point["asl"]
        point |= {"torch_sdpa": peer,
                  "full_vs_torch": round(full["prefill_s"] / peer["prefill_s"], 2) if peer and "prefill_s" in peer else None,
                  "asl_time_saved": round(1 - one_shot["prefill_s"] / full["prefill_s"], 3),
                  "asl_flops_saved": round(1 - one_shot["prefill_flops"] / full["prefill_flops"], 3),
                  "full_fraction_of_gemm_rate": round(full["tflops"] / gemm, 3)}
        done.append((n, time.perf_counter() - start))
        point["seconds"] = round(done[-1][1], 1)
        report.put("benchmark", points)


def _torch_free_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def markdown(data: dict) -> str:
    env = data.get("environment", {})
    lines = ["# Device check results", "",
             f"- date: {env.get('date')}", f"- device: {env.get('device')} ({env.get('backend')})",
             f"- driver / CUDA runtime / CuPy: {env.get('driver')} / {env.get('cuda_runtime')} / {env.get('cupy')}",
             f"- numpy {env.get('numpy')}, torch {env.get('torch')}", f"- command: `{env.get('command')}`", ""]
    lines += [f"**{key}**: {value}" for key, value in data.items() if key.startswith("error in")]
    if "agreement" in data:
        lines += [f"Agreement tests: return code {data['agreement']['returncode']}, {data['agreement']['summary']}", ""]
    if "goldens" in data:
        lines += [f"Goldens on the port ({data['goldens']['weight_dtype']} weights): {data['goldens']['counts']}", ""]
    if "sharing" in data:
        lines += ["Many methods, one prefill (every method shared against alone, bit for bit): " + "; ".join(
            f"{m}: {'identical' if r['identical'] else 'DIFFERENT ' + ', '.join(r['different'])}, "
            f"{r['layers_served']} layers served, {r['held_mib']} MiB held, bound {r['bound_gib']} GiB"
            for m, r in data["sharing"].items()), ""]
    if "gemm_tflops" in data:
        lines += [f"GEMM rate measured in the same run: {data['gemm_tflops']['tflops']} TFLOP/s "
                  f"({data['gemm_tflops']['dtype']})", ""]
    if "linear_gemm_path" in data:
        lines += [f"Linear layers' GEMM path: {data['linear_gemm_path']}", ""]
    if "linear" in data:
        lines += [f"The port's linear layer ({data['linear']['weight_dtype']} weights, float32 out): "
                  f"{data['linear']['tflops']} TFLOP/s, {data['linear']['fraction_of_gemm_rate']} of the GEMM rate", ""]
    if "benchmark" in data:
        lines += ["| tokens | full prefill s | asl prefill s | torch SDPA s | full / torch | full TFLOP/s | "
                  "decode ms/token | peak GiB (full) | asl time saved | asl FLOPs saved |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in data["benchmark"]:
            full, one_shot, t = p.get("full") or {}, p.get("asl") or {}, p.get("torch_sdpa") or {}
            if not full:
                lines.append(f"| {p['tokens']} | {p.get('skipped', 'incomplete')} | | | | | | | | |")
                continue
            peer = t.get("prefill_s", t.get("error", "-"))
            lines.append(f"| {p['tokens']} | {full.get('prefill_s')} | {one_shot.get('prefill_s', p.get('skipped', '-'))} | "
                         f"{peer} | {p.get('full_vs_torch') or '-'} | {full.get('tflops')} | "
                         f"{full.get('decode_ms_per_token')} | {full.get('peak_memory_gib')} | "
                         f"{p.get('asl_time_saved', '-')} | {p.get('asl_flops_saved', '-')} |")
        labels = {p["asl"].get("label", "asl") for p in data["benchmark"] if p.get("asl")}
        lines += ["", f"ASL column: {', '.join(sorted(labels))}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["auto", "cupy", "numpy"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("selfcheck-out"), help="results folder (default selfcheck-out)")
    parser.add_argument("--small", action="store_true", help="a small random model instead of Llama-3.1-8B shapes")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="prompt lengths (default 16384 32768 131072; --small: 256 512)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no length predicted to end after this many seconds (default 420: the whole "
                             "check within 8 minutes)")
    parser.add_argument("--skip-pytest", action="store_true", help="leave out the pytest agreement step")
    parser.add_argument("--block-q", type=int, default=None, metavar="N",
                        help="the port's query block (default: the engine's, 512 on a GPU); a first GPU run may try others")
    parser.add_argument("--block-k", type=int, default=None, metavar="N",
                        help="the port's key block (default: the engine's, 4096 on a GPU)")
    parser.add_argument("--no-tf32", action="store_true", help="CuPy: keep float32 GEMMs off TF32 tensor cores")
    args = parser.parse_args(argv)
    for flag, value in (("--block-q", args.block_q), ("--block-k", args.block_k)):
        if value is not None and value < 1:
            parser.error(f"{flag} must be a positive number of tokens, got {value}")
    blocks = {k: v for k, v in (("block_q", args.block_q), ("block_k", args.block_k)) if v is not None}
    if not args.no_tf32:
        os.environ.setdefault("CUPY_TF32", "1")  # read by CuPy at import: float32 GEMMs on tensor cores

    xp = get_xp(args.backend)
    weight_dtype = "float16" if is_cupy(xp) else "float32"
    lengths = args.lengths or ([256, 512] if args.small else [16384, 32768, 131072])
    report = Report(args.out)
    report.put("environment", environment(xp) | {"blocks": blocks or "the engine's defaults"})
    steps = [] if args.skip_pytest else [("agreement", lambda: run_agreement_tests(report, max(30.0, args.budget_s / 4)))]
    steps += [("goldens", lambda: run_goldens(report, xp, weight_dtype)),
              ("sharing", lambda: run_sharing(report, xp, weight_dtype)),
              ("benchmark", lambda: run_benchmark(report, xp, args.small, lengths, weight_dtype, args.budget_s, blocks))]
    broken = []
    try:
        for name, step in steps:
            try:
                step()
            except Exception as e:  # keep what was measured, say what broke, go on to the next step
                broken.append(name)
                report.put(f"error in {name}", f"{type(e).__name__}: {e}")
                with open(args.out / "errors.log", "a") as log:
                    log.write(f"--- {name}\n{traceback.format_exc()}\n")
    finally:
        if is_cupy(xp):  # known only once a float16 layer ran: the GemmEx check's outcome
            report.put("linear_gemm_path", {True: "cuBLAS GemmEx (float16 in, float32 out, tensor cores)",
                                            False: "widened float32 matmul: GemmEx failed its check (see the warning)",
                                            None: "no float16 layer ran"}[gemm_ex_status()])
        report.write_markdown()
        print(f"results in {args.out}/results.json and {args.out}/gpu-results.md ({report.elapsed():.0f} s)")
    agreement = report.data.get("agreement", {"returncode": 0})  # absent with --skip-pytest; None: timed out
    failed = (broken or agreement["returncode"] != 0
              or report.data.get("goldens", {}).get("counts", {}).get("FAIL")
              or not all(r["identical"] for r in report.data.get("sharing", {}).values()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
