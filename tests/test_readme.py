"""The README's code is real: the plug-in snippet trains, and the commands match what CI runs.

The snippet under "Plug a module into your own Lightning Trainer" starts with the variables a user sets
(POLICY, TRAIN_PAIRS, VAL_PAIRS, OUT, MAX_STEPS); this test rewrites exactly those assignment lines to
a tiny model and tiny data, then executes the block as a script would.
"""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SNIPPET_HEADING = "## Plug a module into your own Lightning Trainer"
SNIPPET_VARIABLES = ("POLICY", "TRAIN_PAIRS", "VAL_PAIRS", "OUT", "MAX_STEPS")


def python_block_under(heading: str) -> str:
    """The first ```python block after ``heading`` and before the next section."""
    text = README.read_text()
    assert heading in text, f"README.md has no section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert match, f"README.md section {heading!r} has no python block"
    return match.group(1)


def substitute(code: str, values: dict[str, object]) -> str:
    """Replace the ``NAME = ...`` line of every variable in ``values``; each must occur exactly once, so a
    renamed README variable fails here instead of silently training on the default paths."""
    for name, value in values.items():
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.MULTILINE)
        assert count == 1, f"README snippet must assign {name} exactly once at line start (found {count})"
    return code


@pytest.fixture()
def tiny_policy_dir(tmp_path, tokenizer, tiny_config) -> str:
    """A tiny causal LM saved as a Hugging Face folder with its tokenizer, as a user's model would be."""
    from rlhf_lightning.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(tiny_config, tokenizer=tokenizer)
    path = tmp_path / "tiny_policy"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_plugin_snippet_fits_a_dpo_module(tmp_path, tiny_policy_dir, assets_dir, monkeypatch):
    from safetensors.torch import load_file

    pairs = os.path.join(assets_dir, "pairs_tiny.jsonl")
    out = tmp_path / "run"
    code = substitute(python_block_under(SNIPPET_HEADING), {
        "POLICY": tiny_policy_dir, "TRAIN_PAIRS": pairs, "VAL_PAIRS": pairs, "OUT": str(out), "MAX_STEPS": 3,
    })
    script = tmp_path / "readme_snippet.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)  # anything the snippet writes relative to the cwd stays in tmp_path

    namespace = runpy.run_path(str(script), run_name="__main__")

    trainer, module = namespace["trainer"], namespace["module"]
    assert trainer.global_step == 3
    assert type(module).__name__ == "DPOModule"
    export = out / "hf" / "final"
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    initial = load_file(os.path.join(tiny_policy_dir, "model.safetensors"))
    trained = load_file(str(export / "model.safetensors"))
    changed = [name for name in initial if not torch.equal(initial[name], trained[name])]
    assert changed, "the exported policy equals the initial one: the snippet did not train"


def test_snippet_sets_every_documented_variable():
    code = python_block_under(SNIPPET_HEADING)
    for name in SNIPPET_VARIABLES:
        assert re.search(rf"^{name} = ", code, flags=re.MULTILINE), name
    assert "L.Trainer(" in code and ".fit(" in code


def test_readme_test_command_is_what_ci_runs():
    """.ci/run promises to run the README's test command verbatim."""
    ci = (REPO / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "python -m pytest" in line).strip()
    assert f"```bash\n{command}\n```" in README.read_text()


def test_readme_pipeline_command_is_a_pipeline_run():
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)\n```", text, flags=re.DOTALL).group(1)
    assert first.strip().endswith("rlhf-lightning pipeline --run-dir runs/quickstart")


def test_every_config_the_readme_names_exists():
    """Configs and scripts named in README.md exist (strategy configs included)."""
    text = README.read_text()
    for path in sorted(set(re.findall(r"`((?:configs|scripts|notebooks)/[\w./-]+\.(?:yaml|py|ipynb))`", text))):
        assert (REPO / path).exists(), f"README.md names {path}, which does not exist"
