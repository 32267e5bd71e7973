"""`asl report DIR`: the table and pictures of an `asl eval` run.

Writes DIR/report.md (task × method: accuracy, mean selection layer, KV saving
vs full, prefill time vs full) and, next to it, report-depth-length.png (a
depth × length accuracy heatmap per method for the tasks with one needle),
report-select-layer.png (ASL's selection layer per task) and
report-accuracy-kv.png (accuracy against KV saving per method).

DIR/results.jsonl and DIR/settings.json are only read. Every results line is
checked (`reference.eval.runner.check_row`): a bad line is an error naming it; a
half-written last line (a run killed while writing it) is skipped with a
warning. The report and the pictures are each written atomically.
"""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from reference.asl.params import METHOD
from reference.errors import OracleError
from reference.eval.runner import read_results
from reference.io.atomic import atomic_write

SELECTING = tuple(name for name, m in METHOD.items() if m.selects)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summarize(rows: list[dict]) -> dict:
    """(task, method) -> accuracy, mean selection layer, fired fraction, KV saving, prefill time vs full."""
    full_time = {(r["task"], r["length"], r["sample"]): r["prefill_seconds"] for r in rows if r["method"] == "full"}
    groups = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["method"])].append(r)
    table = {}
    for (task, method), rs in groups.items():
        ratios = [r["prefill_seconds"] / full_time[(task, r["length"], r["sample"])] for r in rs
                  if full_time.get((task, r["length"], r["sample"]))]
        table[(task, method)] = {
            "n": len(rs), "accuracy": _mean([r["score"] for r in rs]),
            "select_layer": _mean([r["select_layer"] for r in rs]),
            "fired": sum(r.get("fired", r["select_layer"] is not None) for r in rs) / len(rs),
            "kv_saving": 1.0 - _mean([r["kv_fraction"] for r in rs]),
            "time_vs_full": _mean(ratios),
        }
    return table


def _cell(x, fmt):
    return "-" if x is None else format(x, fmt)


def markdown(rows: list[dict], table: dict) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    lines = ["# Evaluation report", "",
             f"{len(rows)} runs; lengths {', '.join(map(str, lengths))} tokens; methods {', '.join(methods)}.", "",
             "Accuracy is the mean task score (docs/evaluation.md); selection layer is the mean over the runs "
             "that selected (fired: the share whose selection was decided; for ASL, whose criterion fired: two-pass "
             "ASL's fallback to the last layer counts in the mean, not as fired); KV saving is 1 − KV bytes / full's; "
             "time is prefill seconds / full's on the same prompt.", "",
             "| task | method | runs | accuracy | selection layer (fired) | KV saving | prefill time vs full |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for task in tasks:
        for method in methods:
            s = table.get((task, method))
            if s is None:
                continue
            layer = f"{_cell(s['select_layer'], '.1f')} ({s['fired']:.0%})" if method in SELECTING else "-"
            lines.append(f"| {task} | {method} | {s['n']} | {_cell(s['accuracy'], '.2f')} | {layer} | "
                         f"{s['kv_saving']:.1%} | {_cell(s['time_vs_full'], '.2f')} |")
    lines += ["", "![accuracy against KV saving](report-accuracy-kv.png)",
              "![ASL's selection layer per task](report-select-layer.png)",
              "![accuracy by needle depth and length](report-depth-length.png)", ""]
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    """The figure as a PNG, written atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())


def pictures(rows: list[dict], table: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        pts = [(s["kv_saving"], s["accuracy"]) for (t, m), s in table.items() if m == method]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=method)
    ax.set(title="Accuracy against KV saving (one point per task)", xlabel="KV saving vs full", ylabel="accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out / "report-accuracy-kv.png")
    plt.close(fig)

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    layers = [[r["select_layer"] for r in rows if r["task"] == t and r["method"] == "asl" and r["select_layer"] is not None]
              for t in tasks]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
    ax.boxplot([ls if ls else [np.nan] for ls in layers], tick_labels=tasks)
    never = [sum(1 for r in rows if r["task"] == t and r["method"] == "asl" and r["select_layer"] is None) for t in tasks]
    ax.set(title="ASL's selection layer per task", xlabel="task",
           ylabel="selection layer ℓ*")
    for i, n in enumerate(never):
        ax.annotate(f"never fired: {n}", (i + 1, ax.get_ylim()[1]), ha="center", va="top", fontsize=8)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    _save(fig, out / "report-select-layer.png")
    plt.close(fig)

    needle = [r for r in rows if r.get("depth") is not None]
    lengths = sorted({r["length"] for r in needle})
    bins = np.linspace(0, 1, 6)
    fig, axes = plt.subplots(1, max(len(methods), 1), figsize=(3.2 * max(len(methods), 1) + 1, 3.4), squeeze=False,
                             sharey=True, constrained_layout=True)
    for k, (ax, method) in enumerate(zip(axes[0], methods)):
        grid = np.full((len(bins) - 1, max(len(lengths), 1)), np.nan)
        for j, n in enumerate(lengths):
            for i in range(len(bins) - 1):
                hit = [r["score"] for r in needle if r["method"] == method and r["length"] == n
                       and bins[i] <= r["depth"] <= bins[i + 1]]
                grid[i, j] = np.mean(hit) if hit else np.nan
        im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="RdYlGn",
                       extent=(-0.5, len(lengths) - 0.5, 0, 1))
        ax.set(title=method, xlabel="length (tokens)", ylabel="needle depth" if k == 0 else "")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.suptitle("Accuracy by needle depth and prompt length")
    _save(fig, out / "report-depth-length.png")
    plt.close(fig)


def write_report(out: Path, with_pictures: bool = True) -> Path:
    """DIR/report.md (and the pictures) from DIR/results.jsonl, which is only read; returns report.md's path."""
    rows = read_results(Path(out))
    if not rows:
        raise OracleError(f"{out}: no results.jsonl rows; run `asl eval ... --out {out}` first")
    table = summarize(rows)
    path = Path(out) / "report.md"
    try:
        atomic_write(path, markdown(rows, table))
        if with_pictures:
            pictures(rows, table, Path(out))
    except OSError as e:
        raise OracleError(f"{out}: cannot write the report ({e.strerror})") from None
    return path
