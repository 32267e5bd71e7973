"""Run the notebooks top to bottom and write them back with their outputs: `make notebooks`.

    python notebooks/execute.py                 # every notebook, full settings, into the committed files
    python notebooks/execute.py 03_variance_criterion.ipynb --out /tmp/nb   # one, elsewhere
    python notebooks/execute.py --small --out /tmp/nb                        # test settings (ASL_NOTEBOOK_SMALL=1)

The committed notebooks are this script's output at full settings, so a reader on a code host sees the
tables and plots without running anything. The result depends only on the code, the checkpoints and the
installed versions: the notebooks fix their own seeds and print no paths or clocks (notebook 04's
measured prefill seconds are the exception, and say so), and this script records no execution times,
drops progress bars, joins a cell's printed pieces into one output and refuses outputs that hold an
absolute path.
tests/test_notebooks.py runs the same `execute` at test settings and checks the committed files.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NOTEBOOKS = sorted(HERE.glob("*.ipynb"))


class OutputError(Exception):
    """An output that must not be committed (a machine's path)."""


def kernel_environment(small: bool, plots: bool = True) -> dict[str, str]:
    """The environment the kernel starts with: this interpreter's venv, the repository importable, no progress bars."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # kernel spec runs "python"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONHASHSEED"] = "0"
    env["TQDM_DISABLE"] = "1"
    env.pop("ASL_NOTEBOOK_SMALL", None)
    if small:
        env["ASL_NOTEBOOK_SMALL"] = "1"
    env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the PNGs
    if not plots:
        env["MPLBACKEND"] = "Agg"  # plt.show() draws nothing: faster, for runs whose outputs are thrown away
    return env


def _is_noise(output) -> bool:
    """Progress bars and widgets: they change from run to run and say nothing once the run is over."""
    if output.output_type == "stream" and output.name == "stderr":
        text = output.text
        return "\r" in text or "it/s]" in text or "%|" in text
    data = output.get("data", {})
    return "application/vnd.jupyter.widget-view+json" in data


def _merged_streams(outputs) -> list:
    """Consecutive stdout (or stderr) pieces as one output: how a print is cut into pieces depends on timing."""
    merged = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (output.output_type == "stream" and previous is not None and previous.output_type == "stream"
                and previous.name == output.name):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def _paths_to_hide() -> list[str]:
    return [p for p in {str(ROOT), str(Path.home()), tempfile.gettempdir(), str(Path(sys.executable).parent)}
            if len(p) > 1]


def _output_text(output) -> str:
    if output.output_type == "stream":
        return output.text
    if output.output_type == "error":
        return "\n".join(output.traceback)
    data = output.get("data", {})
    return "\n".join(v for k, v in data.items() if k.startswith("text/") and isinstance(v, str))


def tidy(nb, name: str) -> None:
    """Strip what would make two runs differ for no reason, and refuse outputs that hold a machine's paths."""
    nb.metadata.pop("widgets", None)
    nb.metadata["language_info"] = {"name": "python"}  # no interpreter version in the committed file
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        cell.outputs = _merged_streams([o for o in cell.outputs if not _is_noise(o)])
        for output in cell.outputs:
            output.get("metadata", {}).pop("execution", None)
            text = _output_text(output)
            for path in _paths_to_hide():
                if path in text:
                    raise OutputError(f"{name}, cell {index}: an output holds the path {path!r}; print a name instead")


def execute(path: Path, small: bool, plots: bool = True, timeout: int = 1800):
    """Run one notebook in a fresh kernel; raises nbclient's CellExecutionError, naming the cell, on any error."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(kernel_environment(small, plots))  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    tidy(nb, path.name)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook file names (default: all of notebooks/)")
    parser.add_argument("--small", action="store_true", help="test settings (ASL_NOTEBOOK_SMALL=1): never commit these")
    parser.add_argument("--out", type=Path, help="write here instead of over the committed notebooks")
    args = parser.parse_args(argv)
    if args.small and args.out is None:
        parser.error("--small needs --out: the committed notebooks are the full-settings run")
    paths = [HERE / Path(n).name for n in args.notebooks] or NOTEBOOKS
    for path in paths:
        start = time.perf_counter()
        try:
            nb = execute(path, args.small)
        except OutputError as e:
            raise SystemExit(str(e)) from None
        target = (args.out / path.name) if args.out else path
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s, {target.stat().st_size / 1e3:.0f} kB -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
