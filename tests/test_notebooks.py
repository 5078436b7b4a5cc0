"""Every notebook under ``notebooks/`` runs top to bottom and prints what it promises."""

import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(REPO.glob("notebooks/*.ipynb"))
# A kernel name of our own, so that no user- or system-wide "python3" spec (possibly
# another interpreter, without this package) can be picked instead of this one.
KERNEL = "sq-lightning-tests"

# Per notebook: regexes its printed (stdout) text must match, and how many figures it shows.
EXPECTED = {
    "walkthrough.ipynb": {
        "stdout": [
            r"model\.net\.1\.weight\s+8192\s+\d+\s+\d+\.\d\d\s+\d+\.\d\d\s+\d\.\d{4}",  # the bits table (bits, entropy, error) ...
            r"bits_weighted=\d\.\d{3}\s+bits_mean=\d\.\d{3}\s+compression_ratio=\d+\.\d\dx\s+entropy_weighted=\d\.\d{3}",  # ... and its summary
            r"validation accuracy of the quantized model: 0\.9\d{3}",  # the quickstart reaches ~0.95
            r"after refinement: val acc 0\.9\d{3}; distinct values per layer",  # the Trainer-free loop
            r"ratio \d+\.\d\dx, \d\.\d\d bits per quantized weight",  # the ExportReport
            r"model\.net\.1\.weight\s+8192\s+\d+\s+\d+\s+ans\s+\d+",  # the entropy-coded export's table
            r"reloaded weights identical: True",
        ],
        "figures": 2,
    },
}


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebook found in {REPO / 'notebooks'}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_valid_json(path):
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter (the venv's), found first through JUPYTER_PATH."""
    write_kernel_spec(tmp_path / "jupyter" / "kernels" / KERNEL, overrides={"display_name": KERNEL})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel, tmp_path):
    nb = nbformat.read(path, as_version=4)
    workdir = tmp_path / "cwd"  # the kernel's working directory: nothing is written to the repo
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=kernel, resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError, with the cell's traceback, on the first failing cell

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    stdout = "".join(out.text for out in outputs if out.output_type == "stream" and out.name == "stdout")
    expected = EXPECTED.get(path.name, {})
    for pattern in expected.get("stdout", []):
        assert re.search(pattern, stdout), f"{path.name} printed nothing matching {pattern!r}; it printed:\n{stdout[-3000:]}"
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    assert figures >= expected.get("figures", 0), f"{path.name} showed {figures} figures"


def test_kernelspec_runs_this_interpreter(kernel):
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec(kernel).argv[0] == sys.executable
