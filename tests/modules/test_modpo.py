"""MODPOModule: zero-weight margins reduce to DPO, score columns are picked by name, source margins are
cached (and equal the live ones), smoke fit with every kind of margin, and the Pareto-front ordering
on the embedded world (slow)."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.losses import modpo_loss
from rlhf_lightning.modules import DPOModule, MODPOModule, Optimization
from rlhf_lightning.modules.modpo import pair_texts
from rlhf_lightning.rewards import FunctionRewardSource, ImplicitRewardSource

from tests.modules.test_dpo import RecordLosses, fit
from tests.modules.test_reward_model import pairs_datamodule

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def completion_words(prompt: str, completion: str) -> float:
    return float(len(completion.split()))


def completion_chars(prompt: str, completion: str) -> float:
    return float(len(completion))


class CountingSource(FunctionRewardSource):
    """Counts the completions it scores (to see whether the cache was used)."""

    def __init__(self, fn=completion_words, name: str = "words"):
        super().__init__(fn, name)
        self.calls = 0

    def __call__(self, prompts, completions, **kwargs):
        self.calls += len(completions)
        return super().__call__(prompts, completions, **kwargs)


def make_module(tiny_config, tokenizer_dir, seed=0, **kwargs) -> MODPOModule:
    torch.manual_seed(seed)
    kwargs.setdefault("optim", Optimization(lr=1e-3))
    return MODPOModule(tiny_config, tokenizer_dir, **kwargs)


def first_batch(tokenizer_dir, assets_dir):
    data = pairs_datamodule(tokenizer_dir, assets_dir, shuffle=False)
    data.setup("fit")
    return data, next(iter(data.train_dataloader()))


def perturb(module) -> None:
    with torch.no_grad():  # the policy differs from the reference, so the loss is not log 2
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    module.model.eval()


def test_zero_weight_margins_equal_dpo(tokenizer_dir, assets_dir, tiny_config):
    """With weights [1, 0, 0] the margins (nonzero here) drop out: loss = DPO's on the same batch."""
    data, batch = first_batch(tokenizer_dir, assets_dir)
    assert batch["chosen_scores"].abs().sum() > 0
    dpo = DPOModule(tiny_config, tokenizer_dir, beta=0.3)
    modpo = make_module(
        tiny_config, tokenizer_dir, beta=0.3, weights=[1.0, 0.0, 0.0], margin_sources=[CountingSource(fn=completion_chars)], margin_score_columns=["length"]
    )
    modpo.model.load_state_dict(dpo.model.state_dict())
    modpo.ref_model.load_state_dict(dpo.ref_model.state_dict())
    torch.manual_seed(1)
    perturb(dpo)
    modpo.model.load_state_dict(dpo.model.state_dict())
    modpo.model.eval()
    modpo.score_names = data.score_names
    loss, metrics = modpo._step(batch, "train")
    dpo_loss_value, dpo_metrics = dpo._step(batch, "train")
    assert_close(loss, dpo_loss_value, atol=1e-6, rtol=0)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert_close(metrics[name], dpo_metrics[name], atol=1e-6, rtol=0)
    margin_chosen, margin_rejected = modpo.margins(batch, "train")
    assert (margin_chosen - margin_rejected).abs().sum() > 0  # the margins were there, only weighted by 0


def test_score_columns_are_picked_by_name(tokenizer_dir, assets_dir, tiny_config):
    data, batch = first_batch(tokenizer_dir, assets_dir)
    assert data.score_names == ["length", "sentiment"]
    module = make_module(tiny_config, tokenizer_dir, weights=[1.0, 0.5, 0.5], margin_score_columns=["sentiment", "length"])
    module.score_names = data.score_names
    chosen, rejected = module.margins(batch, "train")
    assert_close(chosen, batch["chosen_scores"][:, [1, 0]])
    assert_close(rejected, batch["rejected_scores"][:, [1, 0]])
    # ... and they are what enters the loss: recompute it from the parts.
    loss, metrics = module._step(batch, "train")
    pol = module.model
    from rlhf_lightning.modules.pair_forward import pair_logps

    with torch.no_grad():
        p, r = pair_logps(pol, batch), pair_logps(module.reference, batch)
        losses, _, _ = modpo_loss(p.chosen_logps, p.rejected_logps, r.chosen_logps, r.rejected_logps, chosen, rejected, weights=[1.0, 0.5, 0.5])
    assert_close(loss.detach(), losses.mean(), atol=1e-6, rtol=1e-6)
    assert_close(metrics["margins/sentiment"], (batch["chosen_scores"][:, 1] - batch["rejected_scores"][:, 1]).mean())
    module.score_names = ["sentiment"]
    with pytest.raises(KeyError, match="length"):
        module.margins(batch, "train")


def test_text_margins_score_the_decoded_pair(tokenizer, tokenizer_dir, assets_dir, tiny_config):
    _, batch = first_batch(tokenizer_dir, assets_dir)
    prompts, chosen, rejected = pair_texts(batch, tokenizer)
    assert chosen[0] == tokenizer.decode(tokenizer(chosen[0], add_special_tokens=False)["input_ids"])
    module = make_module(tiny_config, tokenizer_dir, weights=[1.0, 1.0], margin_sources=[CountingSource()], precompute_margins=False)
    margin_chosen, margin_rejected = module.margins(batch, "train")
    assert_close(margin_chosen[:, 0], torch.tensor([completion_words(p, c) for p, c in zip(prompts, chosen)]))
    assert_close(margin_rejected[:, 0], torch.tensor([completion_words(p, c) for p, c in zip(prompts, rejected)]))


def test_implicit_reward_margin_is_token_level(tokenizer, tokenizer_dir, assets_dir, tiny_config):
    _, batch = first_batch(tokenizer_dir, assets_dir)
    torch.manual_seed(3)
    from rlhf_lightning.models import load_causal_lm

    policy, reference = load_causal_lm(tiny_config, tokenizer=tokenizer), load_causal_lm(tiny_config, tokenizer=tokenizer)
    source = ImplicitRewardSource(policy, reference, beta=0.1, tokenizer=tokenizer, name="implicit")
    module = make_module(tiny_config, tokenizer_dir, weights=[0.5, 0.5], margin_sources=[source], precompute_margins=False)
    assert module._token_level == [True]
    chosen, rejected = module.margins(batch, "train")
    expected = source.score_pairs(batch)
    assert_close(chosen[:, 0], expected[0])
    assert_close(rejected[:, 0], expected[1])


def test_margin_cache_second_run_does_not_call_the_source(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    cache_dir = tmp_path / "cache"
    sources, recorders = [], []
    for run in range(2):
        source = CountingSource()
        module = make_module(tiny_config, tokenizer_dir, weights=[0.5, 0.5], margin_sources=[source], reference_cache_dir=str(cache_dir))
        recorder = RecordLosses()
        fit(module, tmp_path / f"run{run}", tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=3, val_check_interval=3)
        assert module.margin_cache_hits == {"train": run == 1, "val": run == 1}
        sources.append(source)
        recorders.append(recorder)
    assert sources[0].calls == 2 * 32  # every pair scored once (chosen + rejected), none during training
    assert sources[1].calls == 0
    assert_close(torch.tensor(recorders[1].train), torch.tensor(recorders[0].train), atol=1e-6, rtol=0)
    assert sorted(f.split("-")[2] for f in os.listdir(cache_dir)) == ["train", "val"]
    # A different scoring function is a different fingerprint: a miss, not a stale hit.
    other = CountingSource(fn=completion_chars, name="words")
    module = make_module(tiny_config, tokenizer_dir, weights=[0.5, 0.5], margin_sources=[other], reference_cache_dir=str(cache_dir))
    fit(module, tmp_path / "other", tokenizer_dir, assets_dir, max_steps=1, limit_val_batches=0)
    assert module.margin_cache_hits == {"train": False} and other.calls > 0


def test_precomputed_margins_equal_live(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    runs = {}
    for precompute in (False, True):
        module = make_module(tiny_config, tokenizer_dir, weights=[0.7, 0.3], margin_sources=[CountingSource()], precompute_margins=precompute)
        recorder = RecordLosses()
        fit(module, tmp_path / str(precompute), tokenizer_dir, assets_dir, callbacks=[recorder], max_steps=3, val_check_interval=3)
        runs[precompute] = recorder
    assert_close(torch.tensor(runs[True].train), torch.tensor(runs[False].train), atol=1e-6, rtol=0)
    assert_close(torch.tensor(runs[True].val), torch.tensor(runs[False].val), atol=1e-6, rtol=0)


def test_smoke_fit_with_source_and_column_margins(tmp_path, tokenizer_dir, assets_dir, tiny_config):
    module = make_module(
        tiny_config, tokenizer_dir, weights=[0.5, 0.3, 0.2], margin_sources=[CountingSource()], margin_score_columns=["sentiment"],
        precompute_reference=True,
    )
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit(module, tmp_path, tokenizer_dir, assets_dir, max_steps=3, val_check_interval=3)
    for split in ("train", "val"):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "margins/words",
                     "margins/sentiment"):
            key = f"{split}/{name}"
            assert key in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics[key]), key
    assert module.score_names == ["length", "sentiment"] and module.reference is None
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items()), "the policy did not move"
    assert "margin_sources" not in module.hparams and module.hparams["weights"] == [0.5, 0.3, 0.2]


def test_argument_validation(tokenizer_dir, tiny_config):
    with pytest.raises(ValueError, match="K = 1 \\+ 1"):
        make_module(tiny_config, tokenizer_dir, weights=[1.0], margin_score_columns=["length"])
    with pytest.raises(ValueError, match="weights\\[0\\]"):
        make_module(tiny_config, tokenizer_dir, weights=[0.0, 1.0], margin_score_columns=["length"])
    with pytest.raises(ValueError, match="unique"):
        make_module(tiny_config, tokenizer_dir, weights=[1.0, 1.0, 1.0], margin_sources=[CountingSource(name="length")],
                    margin_score_columns=["length"])


@pytest.mark.parametrize("name", ["modpo.yaml", "modpo_margin_rm.yaml"])
def test_configs_parse(capsys, name):
    from rlhf_lightning.cli import cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", os.path.join(REPO, "configs", name), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    if name == "modpo.yaml":  # stage 2 reads stage 1's export
        assert "rlhf_lightning.modules.MODPOModule" in printed and "outputs/modpo_margin_rm/hf/final" in printed
    else:
        assert "pairs_consistency_train.jsonl" in printed and "default_root_dir: outputs/modpo_margin_rm" in printed


# ---- the Pareto front on the embedded world ------------------------------------------------------------


def _sweep_module():
    from tests.conftest import load_script

    return load_script("pareto_sweep")


@pytest.mark.slow
def test_pareto_sweep_orders_the_extremes(world_dir, sft_policy_dir, tmp_path):
    """MODPO at w_sentiment = 0.9 and 0.1 (w_consistency = 1 - w), through the configs: more weight on an
    objective gives a higher gold score on it (100 held-out prompts, a few samples each)."""
    sweep = _sweep_module()
    rows = sweep.run_sweep(sweep.parse_args([
        "--run-dir", str(tmp_path), "--world-dir", world_dir, "--sft-dir", sft_policy_dir, "--weights", "0.9", "0.1",
        "--quick", "--eval-prompts", "100",
    ]))
    by_weight = {row["w_sentiment"]: row for row in rows if row["w_sentiment"] != ""}
    lean_sentiment, lean_consistency = by_weight[0.9], by_weight[0.1]
    print({w: (r["gold/sentiment"], r["gold/consistency"]) for w, r in by_weight.items()})
    assert lean_sentiment["gold/sentiment"] > lean_consistency["gold/sentiment"] + 0.05
    assert lean_consistency["gold/consistency"] > lean_sentiment["gold/consistency"] + 0.05
    with open(tmp_path / "pareto.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 3  # SFT + 2 weightings
    assert (tmp_path / "pareto.png").stat().st_size > 0
