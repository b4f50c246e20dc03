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


# ---- crafted sequences: the shifted grid, where the score is paid, and GAE on the rollout layout ----


def _crafted_rollout(tokenizer):
    """Two hand-built rows (T = 8, prompt width P = 4, T' = 7):

        column         0    1    2    3   | 4    5    6    7
        row 0 ids      pad  BOS  the  movie | was  great EOS  pad     finished, 3 completion tokens
        row 1 ids      BOS  i    loved it   | and  fun   so   good    cut by max_new_tokens, 4 tokens

    Column t of the shifted grid is the action ids[t + 1], taken in state ids[:t + 1]:
        mask row 0 = [0 0 0 1 1 1 0]   (actions "was", "great", EOS at columns 3, 4, 5)
        mask row 1 = [0 0 0 1 1 1 1]   (actions "and", "fun", "so", "good" at columns 3..6)
    so the sequence score is paid at column 5 (row 0, on EOS) and 6 (row 1, the last token)."""
    tok = tokenizer.convert_tokens_to_ids
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    input_ids = torch.tensor(
        [
            [pad, bos, tok("the"), tok("movie"), tok("was"), tok("great"), eos, pad],
            [bos, tok("i"), tok("loved"), tok("it"), tok("and"), tok("fun"), tok("so"), tok("good")],
        ]
    )
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    completion_mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1, 1]])
    expected_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]], dtype=torch.float32)
    return input_ids, attention_mask, completion_mask, expected_mask


def test_shifted_grid_masks_and_score_column_on_crafted_rows(tiny_model, tokenizer):
    from rlhf_lightning.losses import dense_reward
    from rlhf_lightning.rollout import Rollout

    input_ids, attention_mask, completion_mask, expected_mask = _crafted_rollout(tokenizer)
    tiny_model.eval()
    with torch.no_grad():
        out = policy_forward(tiny_model, input_ids, attention_mask, completion_mask)
        # Reference by hand: log-softmax of the logits at t, read at the token of t + 1, with position
        # ids restarting at the first real token (row 0 is left padded by one).
        position_ids = torch.tensor([[0, 0, 1, 2, 3, 4, 5, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
        logits = tiny_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    torch.testing.assert_close(out.mask, expected_mask)
    for row, col in expected_mask.nonzero().tolist():
        want = torch.log_softmax(logits[row, col], -1)[input_ids[row, col + 1]]
        torch.testing.assert_close(out.logprobs[row, col], want, atol=1e-5, rtol=0)
    assert (out.logprobs[expected_mask == 0] == 0).all()

    n, t = 2, input_ids.shape[1] - 1
    rollout = Rollout(
        input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask, mask=out.mask,
        logprobs=out.logprobs, ref_logprobs=None, values=None, scores=torch.tensor([2.0, -1.0]),
        raw_scores=torch.tensor([2.0, -1.0]), finished=torch.tensor([True, False]),
        completion_lengths=torch.tensor([3, 4]), prompt_index=torch.arange(n), index=None, prompt_length=4,
        prompt_text=["", ""], completion_text=["", ""],
    )
    assert rollout.last_action_index().tolist() == [5, 6]
    # kl_coef 0.5, KL 1 on every action: -0.5 per action, the score added on the last one.
    rewards = dense_reward(torch.ones(n, t) * out.mask, rollout.scores, rollout.mask, kl_coef=0.5)
    torch.testing.assert_close(
        rewards, torch.tensor([[0, 0, 0, -0.5, -0.5, 1.5, 0], [0, 0, 0, -0.5, -0.5, -0.5, -1.5]])
    )


def _gae_loop(rewards, values, mask, gamma, lam):
    """Per-row reversed loop over the valid columns only (they sit in the middle of the row here)."""
    advantages = torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        columns = mask[row].nonzero().flatten().tolist()
        running, next_value = 0.0, 0.0
        for col in reversed(columns):
            delta = rewards[row, col].item() + gamma * next_value - values[row, col].item()
            running = delta + gamma * lam * running
            advantages[row, col] = running
            next_value = values[row, col].item()
    return advantages, (advantages + values) * mask


def test_gae_on_the_rollout_layout_matches_a_reversed_loop(tokenizer):
    """On the shifted grid a row's actions sit between the prompt (left) and the padding (right):
    GAE must neither read the prompt's values nor bootstrap from the padding after the last action."""
    from rlhf_lightning.losses import gae

    *_, mask = _crafted_rollout(tokenizer)
    mask = mask.double()
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    values = torch.randn(mask.shape, generator=generator, dtype=torch.float64)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5)]:
        want_adv, want_ret = _gae_loop(rewards, values, mask, gamma, lam)
        # Values off the mask (prompt states, padding) must not leak in: poison them.
        poisoned = torch.where(mask.bool(), values, torch.full_like(values, 1e6))
        adv, ret = gae(rewards, poisoned, mask, gamma=gamma, lam=lam)
        torch.testing.assert_close(adv, want_adv)
        torch.testing.assert_close(ret, want_ret)


def _reward_sources(tokenizer_dir, tiny_config):
    from rlhf_lightning.rewards import EnsembleRewardSource, GoldRewardSource, RewardModelSource

    torch.manual_seed(0)
    return {
        "function": FunctionRewardSource(_length_reward),
        "gold": GoldRewardSource("sentiment"),
        "reward_model": RewardModelSource(dict(tiny_config), tokenizer=tokenizer_dir),
        "ensemble": EnsembleRewardSource([FunctionRewardSource(_length_reward), GoldRewardSource("fluency")], "mean"),
    }


def test_group_sampling_with_every_reward_source(tiny_model, tokenizer, tokenizer_dir, tiny_config):
    """num_samples_per_prompt = G: one generate call, G consecutive rows per prompt sharing its prompt tokens,
    text and group id; every reward source scores all N = B * G completions."""
    from rlhf_lightning.rollout import concat_rollouts

    batch = _prompt_batch(tokenizer)
    rollouts = {}
    for name, source in _reward_sources(tokenizer_dir, tiny_config).items():
        rollout = collect_rollout(tiny_model, None, tokenizer, batch, reward_fn=source,
                                  sampling={"max_new_tokens": 5, "num_samples_per_prompt": 3}, seed=1)
        assert len(rollout) == 9 and rollout.group_size == 3 and rollout.scores.shape == (9,), name
        assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert rollout.prompt_text == [p for p in PROMPTS for _ in range(3)]
        p = rollout.prompt_length
        for g in range(3):
            assert (rollout.input_ids[g * 3 : g * 3 + 3, :p] == rollout.input_ids[g * 3, :p]).all()
        assert torch.isfinite(rollout.scores).all()
        rollouts[name] = rollout
    # The same seed draws the same completions whatever the reward source.
    assert all(r.completion_text == rollouts["function"].completion_text for r in rollouts.values())
    # The G samples of a prompt are not copies of each other (sampling, not repetition).
    assert len(set(rollouts["function"].completion_text[:3])) > 1

    # concat_rollouts re-pads parts of different prompt widths to one layout and keeps group ids distinct.
    short = collect_rollout(tiny_model, None, tokenizer, {k: (v[2:] if k != "prompt_text" else v[2:]) for k, v in batch.items()},
                            reward_fn=FunctionRewardSource(_length_reward), sampling={"max_new_tokens": 3, "num_samples_per_prompt": 3}, seed=2)
    merged = concat_rollouts([rollouts["function"], short], tokenizer.pad_token_id)
    assert len(merged) == 12 and merged.prompt_length == max(short.prompt_length, rollouts["function"].prompt_length)
    assert merged.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert merged.completion_text[9:] == short.completion_text
    torch.testing.assert_close(merged.mask.sum(1)[9:], short.mask.sum(1))
    torch.testing.assert_close(merged.logprobs.sum(1)[9:], short.logprobs.sum(1))
    with torch.no_grad():
        fresh = policy_forward(tiny_model, merged.input_ids, merged.attention_mask, merged.completion_mask)
    torch.testing.assert_close(fresh.logprobs, merged.logprobs, atol=1e-5, rtol=0)  # the re-padded rows still line up
