"""Generation: stop-token truncation on crafted rows, masks and shapes, and KV-cached greedy == no-cache greedy."""

import pytest
import torch

from rlhf_lightning.generation import (
    SamplingConfig,
    decode_completions,
    generate,
    tokenize_prompts,
    truncate_at_stop,
)
from rlhf_lightning.logprobs import position_ids_from_attention_mask
from rlhf_lightning.models import CausalLMWithValueHead

PROMPTS = ["the movie was", "i loved it and the acting was great", "boring"]


def test_truncate_at_stop_crafted_rows():
    """Stop ids {3, 9}, pad 0. Row by row:
    EOS in the middle -> cut after it; EOS last -> nothing cut; no stop -> unfinished, all kept;
    EOS first -> only the EOS kept; second stop id 9 before EOS -> cut after the 9."""
    ids = torch.tensor(
        [
            [5, 6, 3, 7, 3],
            [5, 6, 7, 8, 3],
            [5, 6, 7, 8, 4],
            [3, 5, 6, 7, 8],
            [5, 9, 6, 3, 7],
        ]
    )
    out_ids, mask, finished = truncate_at_stop(ids, [3, 9], pad_token_id=0)
    torch.testing.assert_close(
        out_ids,
        torch.tensor([[5, 6, 3, 0, 0], [5, 6, 7, 8, 3], [5, 6, 7, 8, 4], [3, 0, 0, 0, 0], [5, 9, 0, 0, 0]]),
    )
    torch.testing.assert_close(
        mask, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    )
    assert finished.tolist() == [True, True, False, True, True]
    # A single int stop id; pad equal to EOS (tokenizers without a pad token) is fine too.
    out_ids, mask, finished = truncate_at_stop(torch.tensor([[4, 3, 3, 3]]), 3, pad_token_id=3)
    assert out_ids.tolist() == [[4, 3, 3, 3]] and mask.tolist() == [[1, 1, 0, 0]] and finished.tolist() == [True]


def test_sampling_config_validates():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def _check_layout(out, prompt_mask, eos_id):
    n, width = out.input_ids.shape
    p = out.prompt_length
    assert out.attention_mask.shape == out.completion_mask.shape == (n, width)
    assert out.completion_ids.shape == (n, width - p)
    torch.testing.assert_close(out.input_ids[:, p:], out.completion_ids)
    torch.testing.assert_close(out.attention_mask[:, :p], prompt_mask[out.prompt_index])
    assert out.completion_mask[:, :p].sum() == 0
    torch.testing.assert_close(out.attention_mask[:, p:], out.completion_mask[:, p:])
    torch.testing.assert_close(out.completion_lengths, out.completion_mask.sum(-1))
    for row in range(n):
        comp = out.completion_ids[row, : int(out.completion_lengths[row])].tolist()
        # completion mask is a contiguous prefix of the completion that ends with EOS iff finished
        assert out.completion_mask[row, p : p + len(comp)].all()
        assert bool(out.finished[row]) == (comp[-1] == eos_id)
        assert eos_id not in comp[:-1]


def test_generate_shapes_masks_and_samples_per_prompt(tiny_model, tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    assert (mask[:, -1] == 1).all()  # left padded
    tiny_model.train()
    out = generate(tiny_model, tokenizer, ids, mask, max_new_tokens=6, num_samples_per_prompt=3, seed=0)
    assert tiny_model.training  # mode restored
    assert out.input_ids.shape[0] == 9 and out.prompt_length == ids.shape[1]
    assert out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert out.completion_ids.shape[1] <= 6
    _check_layout(out, mask, tokenizer.eos_token_id)
    # seeded sampling is reproducible and does not touch the global RNG
    state = torch.get_rng_state()
    again = generate(tiny_model, tokenizer, ids, mask, max_new_tokens=6, num_samples_per_prompt=3, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    torch.testing.assert_close(again.input_ids, out.input_ids)
    texts = decode_completions(tokenizer, out.completion_ids, out.completion_mask[:, out.prompt_length :])
    assert len(texts) == 9 and all(tokenizer.eos_token not in t for t in texts)


def test_generate_stops_at_eos_and_extra_stop_ids(tiny_model, tokenizer):
    """Bias the LM head so that EOS (or a chosen stop word) is always the most likely token."""
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    stop_word = tokenizer.convert_tokens_to_ids("movie")
    for forced, stop_ids in [(tokenizer.eos_token_id, None), (stop_word, [stop_word])]:
        head = tiny_model.get_output_embeddings()
        with torch.no_grad():
            head.weight.zero_()
        head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
        with torch.no_grad():
            head.bias[forced] = 100.0
        out = generate(tiny_model, tokenizer, ids, mask, max_new_tokens=5, do_sample=False, stop_token_ids=stop_ids)
        assert out.completion_ids.shape[1] == 1  # everyone stopped at step one
        assert out.finished.all() and out.completion_lengths.tolist() == [1, 1, 1]
        _check_layout(out, mask, forced)


def _greedy_without_cache(model, input_ids, attention_mask, steps):
    """Reference decoder: full forward at every step, no KV cache, position ids from the mask."""
    ids, mask = input_ids.clone(), attention_mask.clone()
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_attention_mask(mask), use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids[:, input_ids.shape[1] :]


def test_kv_cached_greedy_equals_no_cache_greedy(tiny_model, tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)  # rows have different left padding
    out = generate(tiny_model, tokenizer, ids, mask, max_new_tokens=8, do_sample=False)
    tiny_model.eval()
    with torch.no_grad():
        expected = _greedy_without_cache(tiny_model, ids, mask, out.completion_ids.shape[1])
    expected, expected_mask, _ = truncate_at_stop(expected, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert torch.equal(out.completion_ids, expected)
    assert torch.equal(out.completion_mask[:, out.prompt_length :], expected_mask)


def test_generate_with_value_head_model(tokenizer, tiny_config):
    torch.manual_seed(0)
    model = CausalLMWithValueHead(tiny_config, tokenizer=tokenizer)
    ids, mask = tokenize_prompts(tokenizer, PROMPTS[:2])
    out = generate(model, tokenizer, ids, mask, max_new_tokens=4, do_sample=False)
    plain = generate(model.pretrained_model, tokenizer, ids, mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.input_ids, plain.input_ids)


def test_generate_rejects_right_padding(tiny_model, tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    with pytest.raises(ValueError, match="LEFT"):
        generate(tiny_model, tokenizer, ids.flip(1), mask.flip(1), max_new_tokens=2)


@pytest.mark.parametrize("do_sample", [True, False])
def test_shared_prompt_prefill_encodes_each_prompt_once_and_samples_the_same(tiny_model, tokenizer, do_sample):
    """share_prompt_prefill: the first forward sees the B prompts (minus their last token) once, not B x G
    rows, and the seeded samples are exactly those of the repeated-prompt path."""
    prompts = ["the movie was", "i loved it and the acting was great", "boring"]
    ids, mask = tokenize_prompts(tokenizer, prompts)
    kwargs = dict(max_new_tokens=6, num_samples_per_prompt=3, do_sample=do_sample, seed=3)
    plain = generate(tiny_model, tokenizer, ids, mask, **kwargs)
    shapes = []
    hook = tiny_model.register_forward_pre_hook(lambda module, args, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        shared = generate(tiny_model, tokenizer, ids, mask, share_prompt_prefill=True, **kwargs)
    finally:
        hook.remove()
    assert shapes[0] == (3, ids.shape[1] - 1)  # the prompts, once each
    assert shapes[1] == (9, 1)  # then the 9 samples continue from the repeated cache: last prompt token only
    for field in ("input_ids", "attention_mask", "completion_mask", "prompt_index"):
        assert torch.equal(getattr(plain, field), getattr(shared, field)), field
