"""Log-probs against a naive per-example loop, for left and right padding."""

import pytest
import torch

from rlhf_lightning.logprobs import (
    causal_lm_logprobs,
    entropy_from_logits,
    sequence_logprobs,
    token_logprobs,
)


def _naive_completion_logprob(model, prompt_ids, completion_ids):
    """Unpadded single example: sum_t log p(completion_t | prompt, completion_<t), one token at a time."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0]
    total, entropy = 0.0, []
    for offset, token in enumerate(completion_ids):
        position = len(prompt_ids) + offset - 1  # logits at position t predict token t+1
        log_probs = torch.log_softmax(logits[position].double(), dim=-1)
        total += log_probs[token].item()
        entropy.append(-(log_probs.exp() * log_probs).sum().item())
    return total, entropy


def _batch(examples, pad_id, side):
    lengths = [len(p) + len(c) for p, c in examples]
    width = max(lengths)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    completion = torch.zeros_like(input_ids)
    for row, (prompt, comp) in enumerate(examples):
        seq = prompt + comp
        start = 0 if side == "right" else width - len(seq)
        input_ids[row, start : start + len(seq)] = torch.tensor(seq)
        attention[row, start : start + len(seq)] = 1
        completion[row, start + len(prompt) : start + len(seq)] = 1
    return input_ids, attention, completion


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_lm_logprobs_match_naive_loop(tiny_model, tokenizer, side):
    generator = torch.Generator().manual_seed(1)
    vocab = len(tokenizer)
    examples = []
    for prompt_len, comp_len in [(3, 4), (6, 1), (1, 7), (4, 0)]:
        prompt = torch.randint(4, vocab, (prompt_len,), generator=generator).tolist()
        comp = torch.randint(4, vocab, (comp_len,), generator=generator).tolist()
        examples.append((prompt, comp))
    input_ids, attention, completion = _batch(examples, tokenizer.pad_token_id, side)
    with torch.no_grad():
        out = causal_lm_logprobs(tiny_model, input_ids, attention, completion, return_entropy=True)
        averaged = causal_lm_logprobs(tiny_model, input_ids, attention, completion, average=True)
        for row, (prompt, comp) in enumerate(examples):
            expected, expected_entropy = _naive_completion_logprob(tiny_model, prompt, comp)
            torch.testing.assert_close(out.sequence[row].item(), expected, atol=1e-5, rtol=0)
            torch.testing.assert_close(averaged.sequence[row].item(), expected / max(len(comp), 1), atol=1e-5, rtol=0)
            # per-token entropy on completion positions only, zero elsewhere
            got_entropy = out.entropy[row][out.mask[row].bool()].tolist()
            torch.testing.assert_close(torch.tensor(got_entropy), torch.tensor(expected_entropy, dtype=torch.float32), atol=1e-5, rtol=0)
            assert out.entropy[row][~out.mask[row].bool()].abs().sum() == 0
            assert out.mask[row].sum().item() == len(comp)


def test_sequence_logprobs_by_hand():
    # Two tokens, vocabulary of 2. Row 0: logits (0, 0) -> log p = log(1/2) for either label.
    # Row 0 second position is masked out; row 1: logits (ln 3, 0) -> p(label 0) = 3/4.
    logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0]], [[torch.log(torch.tensor(3.0)), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [0, 1]])
    mask = torch.tensor([[1, 0], [1, 1]])
    expected = torch.tensor([torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.75)) + torch.log(torch.tensor(0.5))])
    torch.testing.assert_close(sequence_logprobs(logits, labels, mask), expected)
    torch.testing.assert_close(sequence_logprobs(logits, labels, mask, average=True), expected / torch.tensor([1.0, 2.0]))
    # masked labels may be -100 (ignored index) without error
    labels_ignored = torch.tensor([[1, -100], [0, 1]])
    torch.testing.assert_close(token_logprobs(logits, labels_ignored, mask)[0, 1], torch.tensor(0.0))


def test_entropy_uniform_is_log_v():
    logits = torch.zeros(2, 3, 8)
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), torch.log(torch.tensor(8.0)).item()))
