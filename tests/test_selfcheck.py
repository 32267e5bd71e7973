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
    points = json.loads((out / "results.json").read_text())["benchmark"]
    assert points == [{"tokens": 128, "skipped": "time budget of 0 s reached"}]
