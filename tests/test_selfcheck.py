"""The prepared device check runs its CPU half here, so the GPU run is not its first run."""

import json
import subprocess
import sys


def test_selfcheck_cpu_half_runs_and_reports(tmp_path):
    out = tmp_path / "sc"
    done = subprocess.run([sys.executable, "-m", "gpu.selfcheck", "--backend", "numpy", "--small", "--skip-pytest",
                           "--out", str(out), "--lengths", "200", "300"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["backend"] == "numpy"
    assert data["goldens"]["counts"]["FAIL"] == 0 and sum(data["goldens"]["counts"].values()) >= 34
    for model, row in data["sharing"].items():  # every method shared is the method alone, and layers were shared
        assert row["identical"] and row["layers_served"] > 0 and row["bound_gib"] > 0, (model, row)
    assert set(data["sharing"]) == {"tiny-llama", "tiny-qwen3"}
    points = data["benchmark"]
    assert [p["tokens"] for p in points] == [200, 300]
    for p in points:
        assert p["full"]["prefill_s"] > 0 and p["full"]["kv_fraction"] == 1.0
        assert p["asl"]["kept"] is not None and p["asl"]["kv_fraction"] < 1.0  # the one-shot selection happened
        assert 0 < p["asl_flops_saved"] < 1
    report = (out / "gpu-results.md").read_text()
    assert "| 300 |" in report and "GEMM rate" in report


def test_selfcheck_budget_skips_what_does_not_fit(tmp_path):
    out = tmp_path / "sc"
    done = subprocess.run([sys.executable, "-m", "gpu.selfcheck", "--backend", "numpy", "--small", "--skip-pytest",
                           "--out", str(out), "--lengths", "128", "--budget-s", "0"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((out / "results.json").read_text())
    assert data["benchmark"] == [{"tokens": 128, "skipped": "time budget of 0 s: reached"}]
    assert "asl_probe" not in data  # nothing of the benchmark ran, not even the probe


def test_selfcheck_skips_a_length_predicted_not_to_fit(tmp_path):
    """The second length is 10^4 times the first: ∝ n² from the first, it would take far longer than the budget,
    so it is skipped before it starts, and the results come in increasing order whatever the order asked."""
    out = tmp_path / "sc"
    done = subprocess.run([sys.executable, "-m", "gpu.selfcheck", "--backend", "numpy", "--small", "--skip-pytest",
                           "--out", str(out), "--lengths", "6400", "64", "--budget-s", "120"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = json.loads((out / "results.json").read_text())["benchmark"]
    assert first["tokens"] == 64 and first["full"]["prefill_s"] > 0
    assert second["tokens"] == 6400 and second["skipped"].startswith("time budget of 120 s: predicted")


def test_the_cost_prediction_follows_its_model():
    from gpu.selfcheck import predicted_seconds

    assert predicted_seconds([], 10) is None
    assert predicted_seconds([(100, 2.0)], 300) == 18.0  # one point: all ∝ n²
    a, b = 0.01, 0.0003  # t = a·n + b·n², through two points, predicts a third
    t = lambda n: a * n + b * n * n  # noqa: E731
    assert abs(predicted_seconds([(100, t(100)), (200, t(200))], 1000) - t(1000)) < 1e-9


def test_a_partial_point_and_a_failed_peer_still_render(tmp_path):
    """A length whose peer raised, or that ran out of memory after `full`, still makes a report row."""
    from gpu.selfcheck import markdown

    full = {"prefill_s": 1.5, "tflops": 3.0, "decode_ms_per_token": 2.0, "peak_memory_gib": 1.0}
    text = markdown({"benchmark": [
        {"tokens": 100, "full": full, "asl": dict(full, prefill_s=1.0, label="asl"),
         "torch_sdpa": {"error": "RuntimeError: boom"}, "full_vs_torch": None, "asl_time_saved": 0.33,
         "asl_flops_saved": 0.4},
        {"tokens": 200, "full": full, "skipped": "out of device memory (OutOfMemoryError)"},
        {"tokens": 400, "skipped": "time budget of 1 s: reached"}]})
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 3
    assert "RuntimeError: boom" in rows[0] and "| 1.5 | 1.0 |" in rows[0]
    assert "out of device memory" in rows[1] and "| 1.5 |" in rows[1]
    assert "time budget" in rows[2]


def test_the_agreement_step_runs_without_tf32_and_includes_the_namespace_check(tmp_path, monkeypatch):
    import gpu.selfcheck as sc

    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(cmd=cmd, env=kwargs["env"])
        return subprocess.CompletedProcess(cmd, 0, stdout="1 passed\n", stderr="")

    monkeypatch.setenv("CUPY_TF32", "1")
    monkeypatch.setattr(sc.subprocess, "run", fake_run)
    sc.run_agreement_tests(sc.Report(tmp_path), 10.0)
    assert seen["env"]["CUPY_TF32"] == "0"
    assert any(c.endswith("test_cupy_namespace.py") for c in seen["cmd"])
    assert any(c.endswith("test_port_agreement.py") for c in seen["cmd"])


def test_an_agreement_timeout_fails_the_check_and_a_failing_peer_does_not_stop_the_benchmark(tmp_path, monkeypatch):
    import gpu.selfcheck as sc

    def timed_out(report, timeout_s):
        report.put("agreement", {"returncode": None, "summary": ["timed out after 1 s"]})

    def peer_fails(cfg, n, on_gpu):
        raise RuntimeError("the peer broke")

    monkeypatch.setattr(sc, "run_agreement_tests", timed_out)
    monkeypatch.setattr(sc, "run_goldens", lambda report, xp, weight_dtype: None)
    monkeypatch.setattr(sc, "torch_point", peer_fails)
    out = tmp_path / "sc"
    assert sc.main(["--backend", "numpy", "--small", "--out", str(out), "--lengths", "64", "96"]) == 1
    data = json.loads((out / "results.json").read_text())
    assert [p["tokens"] for p in data["benchmark"]] == [64, 96]  # both lengths measured despite the peer
    assert all(p["torch_sdpa"] == {"error": "RuntimeError: the peer broke"} and p["full"]["prefill_s"] > 0
               for p in data["benchmark"])
    assert "timed out" in (out / "gpu-results.md").read_text()


def test_the_block_sizes_reach_the_benchmarked_engine(tmp_path, monkeypatch):
    import gpu.selfcheck as sc

    built = []
    real = sc.PortEngine

    def recording(weights, xp, **kwargs):
        engine = real(weights, xp, **kwargs)
        built.append((engine.block_q, engine.block_k))
        return engine

    monkeypatch.setattr(sc, "PortEngine", recording)
    monkeypatch.setattr(sc, "run_goldens", lambda report, xp, weight_dtype: None)
    monkeypatch.setattr(sc, "torch_point", lambda cfg, n, on_gpu: None)
    out = tmp_path / "sc"
    assert sc.main(["--backend", "numpy", "--small", "--skip-pytest", "--out", str(out), "--lengths", "64",
                    "--block-q", "16", "--block-k", "48"]) == 0
    assert (16, 48) in built and json.loads((out / "results.json").read_text())["environment"]["blocks"] == {
        "block_q": 16, "block_k": 48}
    assert built.count((16, 48)) >= 3  # the probe, full and ASL
    done = subprocess.run([sys.executable, "-m", "gpu.selfcheck", "--block-q", "0", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--block-q must be a positive" in done.stderr


def test_the_sharing_step_fails_a_port_that_hands_out_its_remembered_caches(tmp_path, monkeypatch):
    """The bug it exists for: copy_cache returning the remembered cache itself, so a method that compresses in
    place changes what the next method is served (seen only when a compressing method runs first: both orders)."""
    import gpu.selfcheck as sc
    from gpu.backend import get_xp
    from gpu.engine import PortEngine

    monkeypatch.setattr(PortEngine, "copy_cache", lambda self, cache: cache)
    report = sc.Report(tmp_path)
    sc.run_sharing(report, get_xp("numpy"), "float32")
    assert not any(row["identical"] for row in report.data["sharing"].values()), report.data["sharing"]
