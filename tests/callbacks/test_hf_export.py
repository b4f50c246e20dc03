"""HF export: the written directory reloads with from_pretrained and gives the same logits."""

import os

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
