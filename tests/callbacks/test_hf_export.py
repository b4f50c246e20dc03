"""HF export: the written directory reloads with from_pretrained and gives the same logits."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lightning.callbacks.hf_export import save_hf_directory


def test_export_reloads_with_same_logits(tmp_path, tiny_model, tokenizer):
    target = tmp_path / "hf" / "final"
    save_hf_directory(tiny_model, tokenizer, str(target))
    reloaded = AutoModelForCausalLM.from_pretrained(str(target))
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    torch.testing.assert_close(reloaded(ids).logits, tiny_model(ids).logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(str(target)).pad_token_id == tokenizer.pad_token_id


def test_export_replaces_previous_atomically(tmp_path, tiny_model, tokenizer):
    target = tmp_path / "export"
    save_hf_directory(tiny_model, tokenizer, str(target))
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)
    save_hf_directory(tiny_model, tokenizer, str(target))
    reloaded = AutoModelForCausalLM.from_pretrained(str(target))
    torch.testing.assert_close(next(reloaded.parameters()), next(tiny_model.parameters()))
    # no staging or retired directories left behind
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_export_writes_the_modules_gathered_state_dict(tmp_path, tiny_model, tokenizer):
    """Under sharding a module's own weights are shards: HFExport writes ``export_state_dict()`` (the
    gathered full weights, on rank 0) instead, whenever the module returns one."""
    from types import SimpleNamespace

    from rlhf_lightning.callbacks.hf_export import HFExport

    gathered = {name: tensor + 1.0 for name, tensor in tiny_model.state_dict().items()}
    barriers = []
    module = SimpleNamespace(export_model=lambda: tiny_model, export_state_dict=lambda: gathered, tokenizer=tokenizer)
    trainer = SimpleNamespace(
        is_global_zero=True, default_root_dir=str(tmp_path), strategy=SimpleNamespace(barrier=barriers.append)
    )
    path = HFExport().export(trainer, module, "final")
    assert path == str(tmp_path / "hf" / "final") and barriers == ["hf_export"]
    reloaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    for name, tensor in gathered.items():
        torch.testing.assert_close(reloaded[name], tensor, msg=name)


def test_non_finite_weights_never_replace_a_good_export(tmp_path, tiny_model, tokenizer):
    from rlhf_lightning.callbacks.hf_export import NonFiniteWeightsError

    target = tmp_path / "hf" / "final"
    save_hf_directory(tiny_model, tokenizer, str(target))
    good = sorted(os.listdir(target))
    with torch.no_grad():
        next(tiny_model.parameters())[0, 0] = float("nan")
    name = next(n for n, _ in tiny_model.named_parameters())
    with pytest.raises(NonFiniteWeightsError, match=rf"non-finite weights \(NaN/inf in '{name}'\).*previous export at .*final is kept"):
        save_hf_directory(tiny_model, tokenizer, str(target))
    reloaded = AutoModelForCausalLM.from_pretrained(str(target))
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    assert sorted(os.listdir(target)) == good and sorted(os.listdir(tmp_path / "hf")) == ["final"]
    with pytest.raises(NonFiniteWeightsError, match="nothing was written"):
        save_hf_directory(tiny_model, tokenizer, str(tmp_path / "hf" / "best"))
    assert not (tmp_path / "hf" / "best").exists()


def test_export_folder_gets_the_umask_permissions(tmp_path, tiny_model, tokenizer):
    """mkdtemp's staging folder is 0o700; the export used to keep it (unreadable to a group)."""
    old = os.umask(0o022)
    try:
        target = save_hf_directory(tiny_model, tokenizer, str(tmp_path / "export"))
    finally:
        os.umask(old)
    assert os.stat(target).st_mode & 0o777 == 0o755
