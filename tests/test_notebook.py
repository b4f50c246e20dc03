"""notebooks/quickstart.ipynb runs end to end, headless, in the shortened setting (RLHF_QUICKSTART_QUICK=1).

It runs on the session's --tiny pipeline run (RLHF_QUICKSTART_RUN_DIR), so every stage is reused rather
than retrained: what is tested is the notebook's own code — stage wiring, the metric names its plots
read, the evaluation and the report — not training, which tests/test_pipeline.py covers.
"""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_notebook_is_valid_and_saved_without_outputs():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_quickstart_notebook_runs_on_the_pipeline_run(tiny_pipeline_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    run_dir = tiny_pipeline_run["run_dir"]
    results_before = (run_dir / "results.md").read_text()
    monkeypatch.setenv("RLHF_QUICKSTART_QUICK", "1")
    monkeypatch.setenv("RLHF_QUICKSTART_RUN_DIR", str(run_dir))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend must render the figures

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(run_dir)}}).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    # One figure per plot() call (7) and the frontier image.
    assert len(images) >= 8, f"expected >= 8 figures, got {len(images)}"
    assert all(base64.b64decode(image["data"]["image/png"])[:4] == b"\x89PNG" for image in images)
    for stage in ("sft", "reward_model", "modpo_margin_rm", "dpo", "modpo", "ppo", "rloo", "fine_grained"):
        assert f"{stage}: reused" in text, f"the notebook retrained {stage}"
    assert "held-out pairwise accuracy" in text

    markdown = "".join(output["data"].get("text/markdown", "") for output in outputs if "data" in output)
    report = run_dir / "notebook_report"
    with open(report / "results.csv") as handle:
        methods = [row["method"] for row in csv.DictReader(handle)]
    assert methods == ["SFT", "DPO", "MODPO", "PPO", "RLOO", "Fine-Grained RLHF"]
    assert all(f"| {method} |" in markdown for method in methods)
    assert (run_dir / "results.md").read_text() == results_before  # the pipeline's own report is left alone
