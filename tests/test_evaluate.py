"""The evaluation runner: every task x every method on a tiny checkpoint, resumability, refusals."""

import json

import pytest

from reference.asl.params import METHODS, Params
from reference.errors import OracleError
from reference.eval.runner import RESULTS, read_results, run_eval
from reference.eval.tasks import TASKS

SMALL = Params(window=8, kernel=3, select_k=64, tau=0.5, l_min=6, l_obs=4, select_layer=8, filter_layer=5, kv_budget=96)


def test_every_task_and_every_method_run_on_a_tiny_checkpoint(tmp_path):
    path = run_eval("tiny-llama", list(TASKS), [900], 1, list(METHODS), SMALL, tmp_path / "out",
                    max_new_tokens=3, progress=False)
    rows = read_results(tmp_path / "out")
    assert len(rows) == len(TASKS) * len(METHODS) and path.is_file()
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in TASKS for m in METHODS}
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0 and r["kv_fraction"] <= 1.0
        assert abs(r["n_tokens"] - 900) <= 45
    prompts = {}
    for r in rows:  # the same prompt for every method: same answers, same length
        prompts.setdefault(r["task"], (r["n_tokens"], r["answers"]))
        assert prompts[r["task"]] == (r["n_tokens"], r["answers"])
    assert all(r["kv_fraction"] < 1.0 for r in rows if r["method"] == "snapkv")
    assert all(r["kv_fraction"] == 1.0 for r in rows if r["method"] == "full")  # B is snapkv's alone


def test_a_rerun_skips_what_is_done_and_a_killed_run_loses_only_the_line_in_flight(tmp_path):
    out = tmp_path / "out"
    args = ("tiny-qwen2", ["passkey"], [300], 2, ["full", "asl"], SMALL, out)
    run_eval(*args, max_new_tokens=2, progress=False)
    lines = (out / RESULTS).read_text().splitlines()
    assert len(lines) == 4
    (out / RESULTS).write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing line 2
    run_eval(*args, max_new_tokens=2, progress=False)
    again = (out / RESULTS).read_text().splitlines()
    assert len(again) == 4 and again[0] == lines[0]
    keys = [(r["task"], r["length"], r["sample"], r["method"]) for r in map(json.loads, again)]
    assert len(set(keys)) == 4


def test_other_settings_into_the_same_folder_are_refused_and_lose_nothing(tmp_path):
    out = tmp_path / "out"
    run_eval("tiny-llama", ["passkey"], [300], 1, ["full"], SMALL, out, max_new_tokens=2, progress=False)
    before = (out / RESULTS).read_text()
    with pytest.raises(OracleError, match="holds results of other settings .*params"):
        run_eval("tiny-llama", ["passkey"], [300], 1, ["full"], Params(window=4, select_k=32), out,
                 max_new_tokens=2, progress=False)
    assert (out / RESULTS).read_text() == before


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(tasks=["ruler_qa"]), "unknown task"),
    (dict(methods=["h2o"]), "method must be one of"),
    (dict(lengths=[5000]), "max_position_embeddings"),
    (dict(tasks=["passkey", "vt"], lengths=[300, 100]), "too small"),
])
def test_bad_input_is_a_clear_error(tmp_path, kwargs, fragment):
    call = dict(model="tiny-llama", tasks=["passkey"], lengths=[300], samples=1, methods=["full"], params=SMALL,
                out=tmp_path / "out", progress=False) | kwargs
    with pytest.raises(OracleError, match=fragment):
        run_eval(**call)
    assert not (tmp_path / "out" / RESULTS).exists()  # refused before any work


def test_report_table_and_pictures(tmp_path):
    from reference.eval.report import summarize, write_report

    out = tmp_path / "out"
    run_eval("tiny-llama", ["passkey", "niah_single"], [300, 400], 2, ["full", "snapkv", "asl"], SMALL, out,
             max_new_tokens=2, progress=False)
    path = write_report(out)
    text = path.read_text()
    assert "| passkey | asl | 4 |" in text and "| niah_single | full | 4 |" in text
    for picture in ("report-accuracy-kv.png", "report-select-layer.png", "report-depth-length.png"):
        assert (out / picture).stat().st_size > 1000
    rows = read_results(out)
    table = summarize(rows)
    snap = [r for r in rows if r["method"] == "snapkv" and r["task"] == "passkey"]
    assert table[("passkey", "snapkv")]["kv_saving"] == pytest.approx(1 - sum(r["kv_fraction"] for r in snap) / 4)
    assert table[("passkey", "full")]["time_vs_full"] == pytest.approx(1.0)


def test_report_of_an_empty_folder_is_a_clear_error(tmp_path):
    from reference.eval.report import write_report

    with pytest.raises(OracleError, match="no results.jsonl rows"):
        write_report(tmp_path)
