"""The README stays a short user guide, the results page is what the result files generate,
and the documentation site builds with warnings as errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

sys.path.insert(0, str(REPO / "experiments"))
import results_page  # noqa: E402


def test_readme_is_short_with_short_lines():
    text = README.read_text()
    assert len(text.encode()) < 10 * 1024, "README.md must stay under 10 KB: put details in docs/"
    long = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 120]
    assert not long, f"README.md lines over 120 characters: {long}"


def test_results_page_is_what_the_result_files_generate():
    assert (REPO / "docs" / "results.md").read_text() == results_page.page(), (
        "docs/results.md is stale: run `python experiments/results_page.py`"
    )


def test_readme_results_table_is_the_generated_one():
    table = results_page.summary_table()
    assert table in README.read_text(), "README's results table differs from docs/results.md's"
    # Every percentage in README's results section appears in the generated page.
    section = README.read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    page = (REPO / "docs" / "results.md").read_text()
    for figure in re.findall(r"\d+\.\d+%?", section):
        assert figure in page, figure


def test_summary_pivots_the_glance_table():
    # The 2-bit method B cell is the ternary configuration: the best at <= 2 bits.
    rows = {line.split(" | ")[0].strip("| "): line for line in results_page.summary_table().splitlines()[2:]}
    assert set(rows) == {"<= 1 bit", "<= 1.6 bits", "<= 2 bits", "<= 4 bits"}
    assert "84.59 (3, 16+8)" in rows["<= 2 bits"]


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    hits = []
    for name in tracked.stdout.split():
        path = REPO / name
        if path.suffix in {".py", ".md", ".yaml", ".ipynb", ".cfg", ".toml"} and path.is_file():
            if name != "tests/test_docs.py" and re.search(r"\b(DESIGN|STYLE)\.md", path.read_text(errors="ignore")):
                hits.append(name)
    assert not hits, f"files pointing at DESIGN.md / STYLE.md outside the repository: {hits}"


def test_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in ("SoftQuantCallback", "ClusterRefine", "LearnedCodebook", "save_compressed"):
        assert name in api, name
