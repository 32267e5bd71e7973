"""`asl run`: methods and parameters from the command line, the summary line, traces, clear errors."""

import json

import pytest

from reference.cli import main
from reference.oracle.trace import load_trace
from tests.test_cli import assert_clean_error, run_asl

SMALL = ["--window", "4", "--kernel", "3", "--select-k", "24", "--tau", "0.5", "--l-min", "6", "--l-obs", "4",
         "--select-layer", "8", "--filter-layer", "5"]


@pytest.mark.parametrize("method", ["full", "snapkv", "fastkv", "gemfilter", "asl", "asl-2pass"])
def test_every_method_runs_and_prints_one_summary_line(method, tmp_path, capsys):
    extra = ["--kv-budget", "40"] if method == "snapkv" else []
    trace_path = tmp_path / "t.json"
    code = main(["run", "--model", "tiny-llama", "--prompt", "x" * 150, "--method", method, *SMALL, *extra,
                 "--max-new-tokens", "3", "--trace", str(trace_path), "--trace-arrays"])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    summary = [line for line in out if line.startswith(f"[{method}:")]
    assert len(summary) == 1 and "% of full" in summary[0]
    trace, arrays = load_trace(trace_path)
    assert trace["method"] == method and len(trace["prompt_ids"]) == 150 and "logits" in arrays
    layer = trace["select_layer"]
    assert (f"selection layer {layer}" if layer is not None else "no selection") in summary[0]
    if trace["kept_positions"] is not None:
        assert f"kept {len(trace['kept_positions'])} of 150 tokens" in summary[0]


def test_run_parameters_reach_the_method(tmp_path):
    trace_path = tmp_path / "t.json"
    main(["run", "--model", "tiny-qwen2", "--prompt", "y" * 100, "--method", "fastkv", *SMALL,
          "--select-layer", "3", "--kv-budget", "30", "--pooling", "max", "--trace", str(trace_path)])
    trace, arrays = load_trace(trace_path)
    assert trace["params"]["pooling"] == "max" and trace["params"]["kv_budget"] == 30
    assert trace["select_layer"] == 3 and arrays == {}
    assert all(t <= 30 for e in trace["layers"] for t in e["kv_tokens"])


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--tau", "0"], ["tau", "> 0"]),
        (["--kernel", "4"], ["kernel", "odd"]),
        (["--window", "0"], ["window", "≥ 1"]),
        (["--select-k", "4"], ["select-k", "> window"]),
        (["--l-obs", "1"], ["l-obs", "[2, l-min + 1"]),
        (["--l-min", "24"], ["l-min", "[1, 24)"]),
        (["--kv-budget", "4"], ["kv-budget", "> window"]),
        (["--method", "fastkv", "--select-layer", "30"], ["select-layer", "[0, 24)"]),
        (["--method", "gemfilter", "--filter-layer", "-1"], ["filter-layer", "[0, 24)"]),
        (["--method", "snapkv"], ["snapkv needs --kv-budget"]),
    ],
)
def test_bad_parameters_name_the_parameter_and_range(flags, fragments):
    args = ["run", "--model", "tiny-llama", "--prompt", "hello", *SMALL, *flags]
    assert_clean_error(run_asl(*args), *fragments)


def test_malformed_trace_given_to_a_command_is_a_clear_error(tmp_path):
    """`asl run --trace` onto a path holding garbage simply overwrites; reading a bad trace is refused."""
    from reference.errors import OracleError

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(OracleError, match="schema_version"):
        load_trace(bad)


def test_asl_trace_prints_the_decisions(tmp_path):
    trace_path = tmp_path / "t.json"
    main(["run", "--model", "tiny-llama", "--prompt", "z" * 120, "--method", "asl", *SMALL, "--trace", str(trace_path)])
    out = run_asl("trace", str(trace_path))
    assert out.returncode == 0, out.stderr
    assert "<- selected" in out.stdout and "[asl:" in out.stdout


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "JSON"),
    (json.dumps({"schema_version": 999}), "schema_version"),
    (json.dumps({"schema_version": 1}), "version 2 added PyramidInfer"),
    (json.dumps({"schema_version": 2}), "version 3 added recomputed_at"),
    (json.dumps({"schema_version": 3}), "required property"),
])
def test_asl_trace_refuses_malformed_files_in_one_line(tmp_path, content, fragment):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert_clean_error(run_asl("trace", str(bad)), fragment)
    assert_clean_error(run_asl("trace", str(tmp_path / "missing.json")))


def test_backend_numpy_runs_the_port_with_the_same_decisions(capsys):
    args = ["run", "--model", "tiny-qwen2", "--prompt", "w" * 80, "--method", "asl", *SMALL, "--max-new-tokens", "4"]
    main(args)
    reference_out = capsys.readouterr().out
    main(args + ["--backend", "numpy"])
    port_out = capsys.readouterr().out
    assert reference_out.splitlines()[-1] == port_out.splitlines()[-1]  # the summary: same layer, kept, KV


def test_threads_option_sets_the_ports_threads_and_keeps_its_decisions(capsys, monkeypatch):
    import gpu.engine

    made = []
    monkeypatch.setattr(gpu.engine.PortEngine, "__init__",
                        lambda self, *a, _init=gpu.engine.PortEngine.__init__, **k: made.append(k.get("threads"))
                        or _init(self, *a, **k))
    args = ["run", "--model", "tiny-qwen2", "--prompt", "w" * 80, "--method", "asl", *SMALL, "--max-new-tokens", "4",
            "--backend", "numpy"]
    main(args + ["--threads", "1"])
    one = capsys.readouterr().out
    main(args + ["--threads", "3"])
    three = capsys.readouterr().out
    assert made == [1, 3]
    assert one.splitlines()[-1] == three.splitlines()[-1]


@pytest.mark.parametrize("extra", [["--threads", "2"], ["--backend", "numpy", "--threads", "0"]],
                         ids=["without-backend", "zero"])
def test_threads_without_the_numpy_port_is_refused(extra):
    assert_clean_error(run_asl("generate", "--model", "tiny-llama", "--prompt", "hi", *extra), "--threads")


def test_backend_cupy_without_cupy_names_the_fix():
    from gpu.backend import cupy_unavailable_reason

    if cupy_unavailable_reason() is None:
        pytest.skip("CuPy and a GPU are present")
    assert_clean_error(run_asl("generate", "--model", "tiny-llama", "--prompt", "hi", "--backend", "cupy"),
                       "--backend cupy", "asl-oracle[gpu]")


def test_backend_with_float64_is_refused():
    assert_clean_error(run_asl("generate", "--model", "tiny-llama", "--prompt", "hi", "--backend", "numpy",
                               "--dtype", "float64"), "computes in float32")


def test_device_out_of_memory_is_one_clear_line(monkeypatch, capsys):
    """CuPy's OutOfMemoryError (matched by name, so CuPy need not be installed) becomes a one-line error."""
    import reference.asl.generate

    class OutOfMemoryError(Exception):
        pass

    def exhausted(*args, **kwargs):
        raise OutOfMemoryError("out of memory allocating 8,589,934,592 bytes")

    monkeypatch.setattr(reference.asl.generate, "run_prefill", exhausted)
    code = main(["run", "--model", "tiny-llama", "--prompt", "hello", *SMALL, "--backend", "numpy"])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert code == 2 and last.startswith("asl: error: the GPU ran out of memory") and "--kv-budget" in last


def test_unsupported_weight_dtype_is_refused():
    import numpy as np

    from gpu.loader import load_device_weights
    from reference.errors import OracleError
    from tests.conftest import CHECKPOINTS

    with pytest.raises(OracleError, match="weight dtype must be one of float16, float32"):
        load_device_weights(CHECKPOINTS / "tiny-llama", np, "bfloat16", progress=False)


def test_run_warns_when_nothing_would_be_pruned_and_trace_teaches(tmp_path):
    """`asl run` says in one line when the settings keep every token, and what to try; `asl trace` lists only
    the parameters the method reads, |U| and v per scored layer, why a layer was selected, and its units."""
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(list(range(3, 63))))
    out = run_asl("run", "--model", "tiny-llama", "--prompt-ids", str(ids), "--method", "asl", "--window", "8",
                  "--l-min", "6", "--l-obs", "4", "--tau", "0.9", "--max-new-tokens", "2",
                  "--trace", str(tmp_path / "t.json"), "--trace-arrays")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "select-k = 2048 ≥ N = 60" in warnings[0] and "try --select-k below 60" in warnings[0]
    (tmp_path / "short.json").write_text(json.dumps(list(range(3, 23))))
    short = run_asl("run", "--model", "tiny-llama", "--prompt-ids", str(tmp_path / "short.json"), "--method", "fastkv",
                    "--max-new-tokens", "1")
    assert "N = 20 prompt tokens ≤ window = 32" in short.stderr and "try --window below 20" in short.stderr
    shown = run_asl("trace", str(tmp_path / "t.json"))
    assert shown.returncode == 0, shown.stderr
    header = shown.stdout.splitlines()[0]
    assert '"tau": 0.9' in header and "select_layer" not in header and "filter_layer" not in header
    assert "|U|" in shown.stdout and "rank²" in shown.stdout and "score units" in shown.stdout
    assert "<- selected (N ≤ k: the kept set is the whole prompt" in shown.stdout
    assert "numpy.load(" in shown.stdout
