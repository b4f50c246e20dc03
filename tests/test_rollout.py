"""Rollout: old/ref log-probs equal fresh forward passes, identical reference gives KL = 0, values are aligned."""

import copy

import torch

from rlhf_lightning.generation import tokenize_prompts
from rlhf_lightning.logprobs import causal_lm_logprobs, position_ids_from_attention_mask
from rlhf_lightning.models import CausalLMWithValueHead, freeze
from rlhf_lightning.rewards import FunctionRewardSource, RewardTransform
from rlhf_lightning.rollout import RolloutCollector, collect_rollout, policy_forward

PROMPTS = ["the movie was", "i loved it and the acting was great", "boring"]


def _prompt_batch(tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    return {"prompt_input_ids": ids, "prompt_attention_mask": mask, "index": torch.tensor([10, 11, 12]), "prompt_text": PROMPTS}


def _length_reward(prompt, completion):
    return float(len(completion.split()))


def test_rollout_logprobs_match_fresh_forward_and_identical_reference_has_zero_kl(tiny_model, tokenizer):
    reference = freeze(copy.deepcopy(tiny_model))
    batch = _prompt_batch(tokenizer)
    rollout = collect_rollout(
        tiny_model,
        reference,
        tokenizer,
        batch,
        reward_fn=FunctionRewardSource(_length_reward),
        sampling={"max_new_tokens": 6, "temperature": 0.7, "num_samples_per_prompt": 2},
        forward_batch_size=4,  # 6 rows: uneven chunks
        seed=0,
    )
    n, t = rollout.input_ids.shape
    assert n == 6 and rollout.logprobs.shape == rollout.ref_logprobs.shape == rollout.mask.shape == (n, t - 1)
    assert rollout.values is None
    assert rollout.index.tolist() == [10, 10, 11, 11, 12, 12]
    assert rollout.prompt_text == [p for p in PROMPTS for _ in range(2)]
    torch.testing.assert_close(rollout.mask, (rollout.completion_mask[:, 1:] * rollout.attention_mask[:, 1:]).float())
    with torch.no_grad():
        fresh = causal_lm_logprobs(tiny_model, rollout.input_ids, rollout.attention_mask, rollout.completion_mask, temperature=0.7)
    torch.testing.assert_close(rollout.logprobs, fresh.tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.ref_logprobs, rollout.logprobs, atol=1e-6, rtol=0)  # KL = 0
    assert (rollout.logprobs[rollout.mask == 0] == 0).all()
    assert (rollout.logprobs[rollout.mask == 1] < 0).all()
    expected_scores = torch.tensor([_length_reward(p, c) for p, c in zip(rollout.prompt_text, rollout.completion_text)])
    torch.testing.assert_close(rollout.scores, expected_scores)
    # first action at column P - 1, last action at P - 1 + length - 1
    p = rollout.prompt_length
    assert (rollout.mask[:, p - 1] == 1).all() and (rollout.mask[:, : p - 1] == 0).all()
    torch.testing.assert_close(rollout.last_action_index(), p - 2 + rollout.completion_lengths)


def test_rollout_values_are_aligned_with_actions(tokenizer, tiny_config):
    """values[:, t] must be V(s_t): the value head read at the hidden state of position t (which predicts t+1)."""
    torch.manual_seed(0)
    policy = CausalLMWithValueHead(tiny_config, tokenizer=tokenizer, value_head_init_std=0.5)
    rollout = collect_rollout(
        policy, None, tokenizer, _prompt_batch(tokenizer), reward_fn=FunctionRewardSource(_length_reward), max_new_tokens=5, seed=1
    )
    n, t = rollout.input_ids.shape
    assert rollout.values.shape == (n, t - 1) and rollout.ref_logprobs is None
    with torch.no_grad():
        _, full_values = policy(rollout.input_ids, rollout.attention_mask)
        lm_logprobs = causal_lm_logprobs(policy.pretrained_model, rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
    torch.testing.assert_close(rollout.values, full_values[:, :-1] * rollout.mask, atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout.logprobs, lm_logprobs.tokens, atol=1e-5, rtol=0)
    # V(s_t) depends only on tokens <= t: changing the token after a state leaves that state's value unchanged
    row, col = 0, rollout.prompt_length - 1  # state before the first completion token
    edited = rollout.input_ids.clone()
    edited[row, col + 1] = (edited[row, col + 1] + 1) % len(tokenizer)
    with torch.no_grad():
        _, edited_values = policy(edited, rollout.attention_mask)
    torch.testing.assert_close(edited_values[row, col], full_values[row, col])


def test_separate_critic_and_reward_transform(tiny_model, tokenizer, tiny_config):
    torch.manual_seed(1)
    critic = CausalLMWithValueHead(tiny_config, tokenizer=tokenizer, value_head_init_std=0.5)
    transform = RewardTransform(missing_eos_score=-5.0)
    collector = RolloutCollector(FunctionRewardSource(_length_reward), {"max_new_tokens": 3}, reward_transform=transform)
    rollout = collector(tiny_model, None, tokenizer, _prompt_batch(tokenizer), value_model=critic, seed=0)
    with torch.no_grad():
        expected = critic.values(rollout.input_ids, rollout.attention_mask, position_ids_from_attention_mask(rollout.attention_mask))
    torch.testing.assert_close(rollout.values, expected[:, :-1] * rollout.mask)
    torch.testing.assert_close(rollout.scores, torch.where(rollout.finished, rollout.raw_scores, torch.tensor(-5.0)))
    sub = rollout.select([2, 0])
    assert sub.prompt_text == [rollout.prompt_text[2], rollout.prompt_text[0]]
    torch.testing.assert_close(sub.logprobs, rollout.logprobs[[2, 0]])


def test_policy_forward_has_grad_for_updates(tiny_model, tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    completion = torch.zeros_like(mask)
    completion[:, -2:] = 1
    out = policy_forward(tiny_model, ids, mask, completion, return_entropy=True)
    out.logprobs.sum().backward()
    assert tiny_model.get_output_embeddings().weight.grad is not None
    assert out.entropy.shape == out.logprobs.shape
