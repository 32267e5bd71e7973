"""The notebooks: committed executed at full settings (`make notebooks`), and each runs top to bottom here.

The committed files are what a reader on a code host sees, so they must hold a complete, clean run: every
code cell executed in order, no error, no progress bars or machine paths, PNGs of moderate size. The run
in the suite uses short prompts (ASL_NOTEBOOK_SMALL=1); what a notebook's text says about its own outputs
is asserted (or generated) in the notebook itself, so a change of output fails that run (docs/notebooks.md).
"""

import base64
import importlib.util
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 1_000_000  # a notebook with its outputs
MAX_PNG_BYTES = 160_000  # one plot, decoded (80 dpi; a plot of many noisy lines is the largest)
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(/tmp/|/home/|/root/|/Users/|/work/|[A-Z]:\\\\)")


def _execute_module():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOK_DIR / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _execute_module()


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_executed_and_clean(path):
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name}: {path.stat().st_size:,} bytes; lower the plots' dpi"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells[0].cell_type == "markdown" and "teach" in nb.cells[0].source.lower()
    assert "exercise" in nb.cells[-1].source.lower()
    assert "widgets" not in nb.metadata

    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom; run `make notebooks`"
    first = "".join(o.get("text", "") for o in code[0].outputs)
    assert "full setting" in first, f"{path.name}: committed from a test-settings run; run `make notebooks`"

    for n, cell in enumerate(code, 1):
        where = f"{path.name}, code cell {n}"
        assert "execution" not in cell.metadata, f"{where}: execution times recorded"
        for out in cell.outputs:
            assert out.output_type != "error", f"{where}: {out.ename}: {out.evalue}"
            assert not execute._is_noise(out), f"{where}: a progress bar or widget"
            text = execute._output_text(out)
            assert not ABSOLUTE_PATH.search(text), f"{where}: an absolute path in the output"
            png = out.get("data", {}).get("image/png")
            if png:
                size = len(base64.b64decode(png))
                assert size < MAX_PNG_BYTES, f"{where}: a {size:,}-byte PNG; lower its dpi"
        source = cell.source
        if "plt.show()" in source:
            assert any("image/png" in o.get("data", {}) for o in cell.outputs), f"{where}: its plot is missing"
        if re.search(r"^\s*(print|display)\(", source, re.M):
            assert cell.outputs, f"{where}: prints, but has no output"


@pytest.mark.smollm2
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, smollm2_dir):
    # raises CellExecutionError, naming the failing cell, on any error (a failed assert about the outputs included)
    execute.execute(path, small=True, plots=False, timeout=600)


def test_the_notebooks_extra_brings_what_the_readme_runs():
    """README says `pip install -e '.[notebooks]'` then `jupyter lab`; docs/notebooks.md uses nbconvert-style runs:
    the extra names those packages itself (the `jupyter` metapackage has shipped without jupyterlab)."""
    import tomllib

    extra = tomllib.loads((NOTEBOOK_DIR.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", req)[0].lower() for req in extra["notebooks"]}
    assert {"jupyterlab", "nbconvert", "ipykernel", "nbclient"} <= names
    assert "jupyter lab" in (NOTEBOOK_DIR.parent / "README.md").read_text()
