"""SFT through the CLI on the committed tiny JSONL: the loss drops and the export reloads."""

import csv
import glob
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_lightning.cli import cli_main
from rlhf_lightning.modules import SFTModule

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
TINY_MODEL_ARGS = [
    "--model.init_args.model.hidden_size=32",
    "--model.init_args.model.intermediate_size=64",
    "--model.init_args.model.num_hidden_layers=2",
    "--model.init_args.model.num_attention_heads=4",
    "--model.init_args.model.num_key_value_heads=2",
]


def _metric_series(csv_path, name):
    with open(csv_path) as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


def test_cli_fit_sft_config_on_tiny_jsonl_loss_drops_and_exports(tmp_path, tokenizer_dir, assets_dir):
    run_dir = tmp_path / "sft"
    cli_main(
        [
            "fit",
            "--config", os.path.join(REPO, "configs", "sft.yaml"),
            f"--model.init_args.tokenizer={tokenizer_dir}",
            *TINY_MODEL_ARGS,
            f"--data.init_args.train_file={os.path.join(assets_dir, 'sft_tiny.jsonl')}",
            f"--data.init_args.val_file={os.path.join(assets_dir, 'sft_tiny.jsonl')}",
            "--data.init_args.batch_size=16",
            "--trainer.max_steps=60",
            "--trainer.val_check_interval=30",
            "--trainer.log_every_n_steps=5",
            "--trainer.enable_progress_bar=false",
            f"--run_dir={run_dir}",
            f"--trainer.logger.init_args.save_dir={run_dir}",
            "--model.init_args.optim.lr=0.01",
            "--model.init_args.optim.warmup_steps=5",
        ]
    )
    (metrics_csv,) = glob.glob(str(run_dir / "logs" / "*" / "metrics.csv"))
    train_losses = _metric_series(metrics_csv, "train/loss")
    val_losses = _metric_series(metrics_csv, "val/loss")
    assert len(train_losses) >= 5 and len(val_losses) >= 2
    # A drop far beyond step-to-step noise: the templated corpus is easy to fit.
    assert train_losses[-1] < 0.6 * train_losses[0], train_losses
    assert val_losses[-1] < val_losses[0], val_losses
    assert _metric_series(metrics_csv, "val/perplexity")[-1] == pytest.approx(torch.tensor(val_losses[-1]).exp().item(), rel=0.05)

    exported = run_dir / "hf" / "final"
    assert (exported / "config.json").exists() and (exported / "tokenizer.json").exists()
    assert (run_dir / "hf" / "best" / "config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(exported))
    (checkpoint,) = glob.glob(str(run_dir / "**" / "last.ckpt"), recursive=True)
    module = SFTModule.load_from_checkpoint(checkpoint, weights_only=False)
    ids = torch.tensor([[2, 10, 11, 12, 13, 3]])
    torch.testing.assert_close(reloaded(ids).logits, module.model(ids).logits, atol=1e-5, rtol=0)


def test_completion_only_loss_ignores_prompt_tokens(tokenizer_dir, tiny_config):
    torch.manual_seed(0)
    module = SFTModule(tiny_config, tokenizer_dir)
    batch = {
        "input_ids": torch.tensor([[2, 10, 11, 12, 3, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]]),
        "completion_mask": torch.tensor([[0, 0, 0, 1, 1, 0]]),
    }
    loss_completion, _, count = module._nll(batch)
    assert count.item() == 2
    altered = dict(batch, input_ids=torch.tensor([[2, 20, 11, 12, 3, 0]]))  # change a prompt token the loss never scores
    module.completion_only_loss = False
    loss_full, _, count_full = module._nll(batch)
    assert count_full.item() == 4
    assert not torch.allclose(loss_full, loss_completion)
    module.completion_only_loss = True
    assert module._nll(altered)[0].item() != loss_completion.item()  # prompt still conditions the completion


def test_print_config_works(capsys, tokenizer_dir):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", os.path.join(REPO, "configs", "sft.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "rlhf_lightning.modules.SFTModule" in capsys.readouterr().out
