"""Results folders that a crash (or a hand) could leave behind: nothing lost, nothing silently wrong.

`asl report` only reads results.jsonl and settings.json; `asl eval` never deletes an intact row; a bad line is
one error naming its line; a half-written last line is skipped (report) or moved aside (eval); refused
arguments leave no settings.json; outputs are written atomically.
"""

import json
import os
import shutil

import pytest

from reference.asl.params import Params
from reference.cli import main
from reference.errors import OracleError
from reference.eval import runner as evaluate
from reference.eval.report import write_report
from reference.eval.runner import (
    INCOMPLETE,
    RESULTS,
    SETTINGS,
    atomic_write,
    read_results,
    run_eval,
)

SMALL = Params(window=8, kernel=3, select_k=64, tau=0.5, l_min=6, l_obs=4, select_layer=8, filter_layer=5, kv_budget=96)
EVAL = dict(model="tiny-qwen2", tasks=["passkey"], lengths=[300], samples=3, methods=["full"], params=SMALL,
            max_new_tokens=2, progress=False)


def row(i, method="full", **changes):
    r = {"task": "passkey", "length": 300, "sample": i, "seed": i, "method": method, "n_tokens": 306,
         "depth": 0.5, "prediction": "86523", "answers": ["86523"], "score": 1.0, "select_layer": None,
         "fired": False, "kept_tokens": None, "kv_bytes": 1000, "kv_fraction": 1.0,
         "prefill_flops_fraction": 1.0, "prefill_seconds": 0.5, "decode_seconds": 0.1}
    if method == "asl":
        r.update(select_layer=3, fired=True, kept_tokens=80, kv_bytes=400, kv_fraction=0.4,
                 prefill_flops_fraction=0.6, prefill_seconds=0.3)
    return r | changes


def six_lines():
    return [json.dumps(row(i, m)) for i in range(3) for m in ("full", "asl")]


def folder(tmp_path, lines, end="\n"):
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULTS).write_bytes(("\n".join(lines) + end).encode())
    (out / SETTINGS).write_text('{"pinned": true}\n')
    return out


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asl: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A finished `asl eval` folder: 3 samples of passkey with the full method on a tiny checkpoint."""
    out = tmp_path_factory.mktemp("eval") / "out"
    run_eval(out=out, **EVAL)
    return out


@pytest.fixture
def eval_copy(evaluated, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated, out)
    return out, (out / RESULTS).read_text().splitlines()


# --- asl report: reads only -----------------------------------------------------------------------

@pytest.mark.parametrize("bad, fragment", [
    ("{\"task\": \"passkey\", \"len", "line 3: not valid JSON"),
    ("", "line 3: empty line"),
    ("   ", "line 3: empty line"),
])
def test_report_refuses_a_bad_middle_line_and_changes_nothing(tmp_path, capsys, bad, fragment):
    lines = six_lines()
    lines[2] = bad
    out = folder(tmp_path, lines)
    before = snapshot(out)
    assert main(["report", str(out)]) == 2
    message = one_error_line(capsys)
    assert str(out / RESULTS) in message and fragment in message
    assert snapshot(out) == before  # byte-identical, and no report.md written


@pytest.mark.parametrize("bad, fragment", [
    ("7", "is a number, not a JSON object"),
    ("[1, 2]", "is a list"),
    ("null", "is null"),
    (json.dumps({k: v for k, v in row(1).items() if k not in ("score", "kv_bytes")}), "lacks score, kv_bytes"),
    (json.dumps(row(1, score="1.0")), 'score must be a number in [0, 1], got "1.0"'),
    (json.dumps(row(1, length="300")), "length must be an integer > 0"),
    (json.dumps(row(1, length=300.0)), "length must be an integer > 0"),
    (json.dumps(row(1, sample=True)), "sample must be an integer >= 0"),
    (json.dumps(row(1, sample=-1)), "sample must be an integer >= 0"),
    (json.dumps(row(1, depth=7.5)), "depth must be null or a number in [0, 1], got 7.5"),
    (json.dumps(row(1, kv_fraction=7)), "kv_fraction must be a number in [0, 1], got 7"),
    (json.dumps(row(1, score=float("nan"))), "score must be a number in [0, 1], got NaN"),
    (json.dumps(row(1, prefill_seconds=-0.2)), "prefill_seconds must be a number >= 0"),
    (json.dumps(row(1, decode_seconds=None)), "decode_seconds must be a number >= 0"),
    (json.dumps(row(1, task="ruler_qa")), "task must be a known task name"),
    (json.dumps(row(1, method="h2o")), "method must be one of"),
    (json.dumps(row(1, answers="86523")), "answers must be a list of strings"),
    (json.dumps(row(1, answers=[86523])), "answers must be a list of strings"),
    (json.dumps(row(1, prediction=None)), "prediction must be a string"),
    (json.dumps(row(1, select_layer=2.5)), "select_layer must be null or an integer >= 0"),
    (json.dumps(row(1, kept_tokens=-3)), "kept_tokens must be null or an integer >= 0"),
    (json.dumps(row(1, fired="yes")), "fired must be true or false"),
    (json.dumps(row(1, n_tokens=0)), "n_tokens must be an integer > 0"),
    (json.dumps(row(0)), "line 2: repeats the run of line 1"),
])
def test_rows_of_wrong_shape_types_or_ranges_are_refused_with_their_line(tmp_path, bad, fragment):
    lines = [json.dumps(row(0)), bad, json.dumps(row(2))]
    out = folder(tmp_path, lines)
    before = snapshot(out)
    with pytest.raises(OracleError, match="line 2: ") as e:
        read_results(out)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(OracleError, match="line 2: "):
        write_report(out, with_pictures=False)
    assert snapshot(out) == before


def test_a_row_without_fired_is_still_read():
    r = row(0)
    del r["fired"]
    assert evaluate.check_row(r) is None


def test_report_skips_a_half_written_last_line_with_a_warning_and_leaves_the_file(tmp_path, capsys):
    lines = six_lines()
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    out = folder(tmp_path, lines, end="")  # killed while writing line 6
    before = snapshot(out)
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "asl: warning:" in err and "line 6: half-written last line" in err and "skipped" in err
    assert (out / "report.md").is_file() and "5 runs" in (out / "report.md").read_text()
    after = snapshot(out)
    for name in (RESULTS, SETTINGS):
        assert after[name] == before[name]
    assert set(after) == set(before) | {"report.md", "report-accuracy-kv.png", "report-select-layer.png",
                                         "report-depth-length.png"}  # no temporary files left behind
    assert all(after[p].startswith(b"\x89PNG") for p in after if p.endswith(".png"))


def test_a_whole_last_row_without_its_newline_is_used(tmp_path, capsys):
    out = folder(tmp_path, six_lines(), end="")
    assert len(read_results(out)) == 6
    assert capsys.readouterr().err == ""


def test_a_bad_but_complete_json_last_line_is_an_error_not_skipped(tmp_path):
    lines = six_lines()
    lines[-1] = "7"
    out = folder(tmp_path, lines, end="")
    with pytest.raises(OracleError, match="line 6: is a number"):
        read_results(out)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.md"
    path.write_text("old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.md"]


# --- asl eval: never deletes an intact row --------------------------------------------------------

@pytest.mark.parametrize("bad", ["{\"task\": ", "", json.dumps(row(1, depth=7.5))])
def test_eval_refuses_a_bad_middle_line_before_any_work(eval_copy, bad):
    out, lines = eval_copy
    lines[1] = bad
    (out / RESULTS).write_text("\n".join(lines) + "\n")
    before = snapshot(out)
    with pytest.raises(OracleError, match=r"results.jsonl line 2: .*nothing was changed"):
        run_eval(out=out, **EVAL)
    assert snapshot(out) == before


def test_eval_moves_a_half_written_last_line_aside_and_resumes(eval_copy, capsys):
    out, lines = eval_copy
    partial = lines[2][: len(lines[2]) // 2]
    (out / RESULTS).write_text(lines[0] + "\n" + lines[1] + "\n" + partial)  # killed while writing line 3
    run_eval(out=out, **EVAL)
    assert "line 3: half-written last line" in capsys.readouterr().err
    assert (out / INCOMPLETE).read_text() == partial + "\n"
    again = (out / RESULTS).read_text().splitlines()
    assert again[:2] == lines[:2] and len(again) == 3 and json.loads(again[2])["sample"] == 2
    # a second crash: the side file is appended to, never overwritten
    (out / RESULTS).write_text(lines[0] + "\n" + "{\"task")
    run_eval(out=out, **EVAL)
    assert (out / INCOMPLETE).read_text() == partial + "\n" + "{\"task" + "\n"
    assert (out / RESULTS).read_text().splitlines()[0] == lines[0]
    assert len(read_results(out)) == 3


def test_eval_completes_a_last_row_that_lacks_only_its_newline(eval_copy):
    out, lines = eval_copy
    (out / RESULTS).write_text(lines[0] + "\n" + lines[1])
    run_eval(out=out, **EVAL)
    again = (out / RESULTS).read_text().splitlines()
    assert again[:2] == lines[:2] and len(again) == 3 and not (out / INCOMPLETE).exists()


def test_eval_refuses_rows_outside_its_settings(eval_copy):
    out, lines = eval_copy
    (out / RESULTS).write_text("\n".join(lines) + "\n" + json.dumps(row(0, "asl")) + "\n")
    before = snapshot(out)
    with pytest.raises(OracleError, match="line 4: is a run outside these settings"):
        run_eval(out=out, **EVAL)
    assert snapshot(out) == before


def test_eval_refuses_results_without_settings_and_a_broken_settings_file(eval_copy):
    out, _ = eval_copy
    settings = (out / SETTINGS).read_bytes()
    (out / SETTINGS).unlink()
    with pytest.raises(OracleError, match="no settings.json"):
        run_eval(out=out, **EVAL)
    assert not (out / SETTINGS).exists()
    (out / SETTINGS).write_bytes(settings[: len(settings) // 2])
    with pytest.raises(OracleError, match="settings.json cannot be read as JSON"):
        run_eval(out=out, **EVAL)
    assert (out / SETTINGS).read_bytes() == settings[: len(settings) // 2]


# --- arguments: every one checked before settings.json is written ---------------------------------

@pytest.mark.parametrize("changes, fragment", [
    (dict(max_new_tokens=-1), "--max-new-tokens must be >= 0"),
    (dict(tasks=[]), "--tasks is empty"),
    (dict(methods=[]), "--methods is empty"),
    (dict(lengths=[]), "--lengths is empty"),
    (dict(lengths=[0]), "--lengths must be positive integers"),
    (dict(lengths=[-300]), "--lengths must be positive integers"),
    (dict(samples=0), "--samples must be >= 1"),
    (dict(tasks=["passkey", "passkey"]), "--tasks names passkey more than once"),
    (dict(methods=["full", "h2o"]), "method must be one of"),
    (dict(methods=["snapkv"], params=Params(select_k=64)), "needs --kv-budget"),
    (dict(max_new_tokens=5000), "max_position_embeddings"),
])
def test_refused_arguments_leave_no_settings_and_the_corrected_rerun_works(tmp_path, changes, fragment):
    out = tmp_path / "out"
    with pytest.raises(OracleError, match=fragment):
        run_eval(out=out, **(EVAL | dict(samples=1) | changes))
    assert not out.exists()
    if changes == dict(max_new_tokens=-1):
        run_eval(out=out, **(EVAL | dict(samples=1)))
        assert len(read_results(out)) == 1


@pytest.mark.parametrize("flags, fragment", [
    (["--tasks", ","], "--tasks is empty"),
    (["--methods", ""], "--methods is empty"),
    (["--lengths", ","], "--lengths is empty"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
])
def test_cli_refuses_empty_lists_in_one_line(tmp_path, capsys, flags, fragment):
    out = tmp_path / "out"
    assert main(["eval", "--model", "tiny-qwen2", "--lengths", "300", "--out", str(out), *flags]) == 2
    assert fragment in one_error_line(capsys)
    assert not out.exists()
