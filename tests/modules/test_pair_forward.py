"""The concatenated pair forward equals two separate forwards (chosen, rejected) to 1e-5."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from rlhf_lightning.data import PreferenceCollator
from rlhf_lightning.logprobs import causal_lm_logprobs
from rlhf_lightning.models import load_reward_model, reward_model_scores
from rlhf_lightning.modules.pair_forward import (
    concatenate_pair,
    pair_logps,
    reference_pair_logps,
    reward_pair_scores,
)

PAIRS = [
    ("the movie was", "great fun", "bad and very very boring"),
    ("this film is", "really good and the acting was great", "awful"),
    ("i", "loved it", "hated it"),
]


def make_batch(tokenizer, pairs=PAIRS) -> dict[str, torch.Tensor]:
    """A preference batch built by hand with the library's tokenization convention (prompt with
    special tokens, completion without + EOS); chosen and rejected have different padded lengths."""
    features = []
    for i, (prompt, chosen, rejected) in enumerate(pairs):
        completion = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        features.append(
            {
                "prompt_ids": tokenizer(prompt, add_special_tokens=True)["input_ids"],
                "chosen_ids": completion(chosen),
                "rejected_ids": completion(rejected),
                "index": i,
                "margin": float(i),
            }
        )
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(features)


def test_concatenate_pads_both_sides_to_one_length(tokenizer):
    batch = make_batch(tokenizer)
    b, tc, tr = batch["chosen_input_ids"].shape[0], batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1]
    assert tc != tr  # the point of the test: unequal lengths
    pair = concatenate_pair(batch, pad_token_id=tokenizer.pad_token_id)
    assert pair.input_ids.shape == (2 * b, max(tc, tr))
    assert pair.num_pairs == b
    assert_close(pair.attention_mask[:b, :tc], batch["chosen_attention_mask"])
    assert_close(pair.completion_mask[b:, :tr], batch["rejected_completion_mask"])
    assert pair.attention_mask[:b, tc:].sum() == 0 and pair.attention_mask[b:, tr:].sum() == 0


def test_pair_logps_equal_two_separate_forwards(tokenizer, tiny_model):
    batch = make_batch(tokenizer)
    tiny_model.eval()
    for average in (False, True):
        out = pair_logps(tiny_model, batch, average=average, return_logits_mean=True)
        for side, got in (("chosen", out.chosen_logps), ("rejected", out.rejected_logps)):
            separate = causal_lm_logprobs(
                tiny_model,
                batch[f"{side}_input_ids"],
                batch[f"{side}_attention_mask"],
                batch[f"{side}_completion_mask"],
                average=average,
            )
            assert_close(got, separate.sequence, atol=1e-5, rtol=1e-5)
            expected_tokens = batch[f"{side}_completion_mask"][:, 1:].sum(-1).float()
            assert_close(getattr(out, f"{side}_tokens"), expected_tokens)
        assert out.chosen_logits_mean.shape == () and torch.isfinite(out.chosen_logits_mean)


def test_pair_logps_gradient_flows_and_reference_has_none(tokenizer, tiny_model):
    batch = make_batch(tokenizer)
    out = pair_logps(tiny_model, batch)
    assert out.chosen_logps.requires_grad
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.parameters())
    ref = reference_pair_logps(tiny_model, batch)
    assert not ref.chosen_logps.requires_grad and ref.chosen_logits_mean is None
    assert_close(ref.chosen_logps, out.chosen_logps.detach())


def test_reward_pair_scores_equal_separate_scores(tokenizer, tiny_config):
    torch.manual_seed(0)
    rm = load_reward_model(tiny_config, tokenizer=tokenizer).eval()
    batch = make_batch(tokenizer)
    chosen, rejected = reward_pair_scores(rm, batch)
    assert chosen.shape == rejected.shape == (len(PAIRS),)
    assert_close(chosen, reward_model_scores(rm, batch["chosen_input_ids"], batch["chosen_attention_mask"]), atol=1e-5, rtol=1e-5)
    assert_close(rejected, reward_model_scores(rm, batch["rejected_input_ids"], batch["rejected_attention_mask"]), atol=1e-5, rtol=1e-5)
