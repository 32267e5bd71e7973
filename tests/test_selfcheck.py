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
