"""The architecture matrix: tiny random GPT-2, OPT, GPT-NeoX, Llama, Qwen2, Mistral, Gemma, Gemma-2 and
Phi-3 (hidden 32, 2 layers, matrices re-drawn with std 0.3 so padding or position errors show) with a
byte-level BPE tokenizer where pad == eos, each through the library's contracts:

* per-token log-probs of a padded batch (right and left padding) equal a naive forward of each row alone;
* DPO's step-0 loss is ln 2 with precomputed reference log-probs (policy == reference);
* PPO's first rollout has KL = 0 to a reference equal to the policy (shared-trunk value head);
* a reward model fits a separable toy preference set, and its export reloads with identical scores,
  also when scored with plain transformers as the README shows;

and the same with ``peft:`` (LoRA) for Llama and GPT-2. Encoder-decoders get a clear error.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.generation import tokenize_prompts
from rlhf_lightning.logprobs import causal_lm_logprobs
from rlhf_lightning.models import load_causal_lm, load_reward_model, load_tokenizer, reward_model_scores
from rlhf_lightning.modules import DPOModule, Optimization, PPOModule, RewardModelModule
from rlhf_lightning.rewards import FunctionRewardSource

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128}
ARCHITECTURES = {
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "opt": {"model_type": "opt", **SMALL, "ffn_dim": 64, "word_embed_proj_dim": 32},
    "gpt_neox": {"model_type": "gpt_neox", **SMALL, "intermediate_size": 64},
    "llama": {"model_type": "llama", **SMALL, "intermediate_size": 64, "num_key_value_heads": 2},
    "qwen2": {"model_type": "qwen2", **SMALL, "intermediate_size": 64, "num_key_value_heads": 2},
    "mistral": {"model_type": "mistral", **SMALL, "intermediate_size": 64, "num_key_value_heads": 2},
    "gemma": {"model_type": "gemma", **SMALL, "intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8},
    "gemma2": {"model_type": "gemma2", **SMALL, "intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8},
    "phi3": {"model_type": "phi3", **SMALL, "intermediate_size": 64, "num_key_value_heads": 2},
}
LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
CASES = [pytest.param(name, None, id=name) for name in ARCHITECTURES] + [
    pytest.param(name, LORA, id=f"{name}-lora") for name in ("llama", "gpt2")
]
PAIRS = [
    {"prompt": "the movie was", "chosen": "great fun", "rejected": "awful and boring"},
    {"prompt": "this film is", "chosen": "really good", "rejected": "so bad"},
    {"prompt": "i think the plot", "chosen": "was great", "rejected": "was awful"},
    {"prompt": "the acting", "chosen": "is good fun", "rejected": "is boring"},
]


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer_dir):
    return load_tokenizer(bpe_tokenizer_dir)


def build(name: str, tokenizer, *, seed: int = 0, reward_model: bool = False) -> torch.nn.Module:
    """The tiny model with every matrix re-drawn from N(0, 0.3^2) (norms keep their init)."""
    torch.manual_seed(seed)
    loader = load_reward_model if reward_model else load_causal_lm
    model = loader(dict(ARCHITECTURES[name]), tokenizer=tokenizer)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.3)
    return model.eval()


def _rows(tokenizer):
    texts = ["the movie was great fun", "a long boring film and the acting was bad i think", "good story"]
    return [torch.tensor(tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]) for t in texts]


def _padded(rows, pad_id, side):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = row, 1
    return ids, mask


def _pair_batch(tokenizer):
    data = PreferenceDataModule(dataset=PAIRS, batch_size=len(PAIRS), shuffle=False)
    data.set_tokenizer(tokenizer)
    data.setup("fit")
    return data, next(iter(data.train_dataloader()))


@pytest.mark.parametrize("name,peft", CASES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_logprobs_equal_unpadded_forward(name, peft, side, bpe):
    from rlhf_lightning.models import apply_peft

    model = apply_peft(build(name, bpe), peft).eval()
    rows = _rows(bpe)
    ids, mask = _padded(rows, bpe.pad_token_id, side)
    assert bpe.pad_token_id == bpe.eos_token_id  # the hard case: pad ids also occur as real tokens
    with torch.no_grad():
        # Score every real token but each row's first (nothing predicts it, whichever side pads).
        first = mask.argmax(-1)
        score = mask.clone()
        score[torch.arange(len(rows)), first] = 0
        batched = causal_lm_logprobs(model, ids, mask, score)
        for i, row in enumerate(rows):
            logits = model(input_ids=row[None]).logits[0, :-1].float()
            naive = logits.log_softmax(-1).gather(-1, row[1:, None]).squeeze(-1)
            got = batched.tokens[i][batched.mask[i].bool()]
            assert_close(got, naive, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,peft", CASES)
def test_dpo_step_zero_loss_is_ln2_with_precomputed_reference(name, peft, bpe, bpe_tokenizer_dir):
    module = DPOModule(build(name, bpe), bpe_tokenizer_dir, precompute_reference=True, peft=peft)
    data, batch = _pair_batch(module.tokenizer)
    module.precompute_reference_logps({"train": data.train_dataloader()})
    assert module.reference is None
    module.train()
    loss, _ = module._step(batch, "train")
    assert_close(loss, torch.tensor(math.log(2.0)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,peft", CASES)
def test_ppo_first_rollout_kl_is_zero_with_policy_equal_to_reference(name, peft, bpe, bpe_tokenizer_dir):
    module = PPOModule(build(name, bpe), bpe_tokenizer_dir, peft=peft, reward=FunctionRewardSource(lambda p, c: float(len(c))),
                       sampling={"max_new_tokens": 6}, log_samples_every_n_steps=0)
    prompts = ["the movie was", "a long boring film and the acting"]
    ids, mask = tokenize_prompts(module.tokenizer, prompts)
    rollout = module.collect({"prompt_input_ids": ids, "prompt_attention_mask": mask, "prompt_text": prompts})
    assert rollout.mask.sum() > 0 and torch.isfinite(rollout.values).all()
    assert_close(rollout.logprobs * rollout.mask, rollout.ref_logprobs * rollout.mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,peft", CASES)
def test_reward_model_fits_and_its_export_scores_identically(name, peft, bpe, bpe_tokenizer_dir, tmp_path):
    module = RewardModelModule(build(name, bpe, reward_model=True), bpe_tokenizer_dir, peft=peft, optim=Optimization(lr=1e-2))
    _, batch = _pair_batch(module.tokenizer)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    module.train()
    losses = []
    for _ in range(30):
        loss, chosen, rejected = module._step(batch)
        losses.append(float(loss))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0] and bool((chosen > rejected).all()), losses[::10]

    module.eval()
    model = module.model
    if peft is not None:  # a LoRA RM exports the adapter; merged weights load with plain transformers
        from rlhf_lightning.models import merged_copy

        model = merged_copy(model)
    model.save_pretrained(tmp_path / "rm")
    module.tokenizer.save_pretrained(tmp_path / "rm")
    ids, mask = _padded(_rows(bpe), bpe.pad_token_id, "right")
    with torch.no_grad():
        expected = reward_model_scores(module.model, ids, mask)
        reloaded = load_reward_model(str(tmp_path / "rm")).eval()
        assert_close(reward_model_scores(reloaded, ids, mask), expected, atol=1e-5, rtol=1e-5)
        # Plain transformers, as the README shows: read the score head at the last real token.
        hidden = reloaded.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(-1) - 1  # right padding
        plain = reloaded.score(hidden[torch.arange(len(ids)), last]).squeeze(-1)
        assert_close(plain, expected, atol=1e-5, rtol=1e-5)


def test_encoder_decoder_is_a_clear_error(bpe, bpe_tokenizer_dir, tmp_path):
    t5 = {"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 4, "d_kv": 8}
    with pytest.raises(ValueError, match="causal LMs only"):
        load_causal_lm(t5, tokenizer=bpe)
    with pytest.raises(ValueError, match="causal LMs only"):
        DPOModule(dict(t5), bpe_tokenizer_dir)
    from transformers import AutoConfig, T5ForConditionalGeneration

    T5ForConditionalGeneration(AutoConfig.for_model(**t5, vocab_size=len(bpe))).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="causal LMs only"):
        load_causal_lm(str(tmp_path / "t5"))
