"""Packing plans: first-fit rows, token placement, positions, the shared-prompt tree and its mask."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.data.packing import first_fit_rows, pack_pairs, pack_sequences, tree_attention_allowed


def right_padded(sequences, pad=0):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def test_first_fit_decreasing_by_hand():
    """Lengths [5, 3, 4, 2, 6], budget 8: longest first 6 -> row0 (room 2); 5 -> row1 (3); 4 -> row2 (4);
    3 -> row1 (0); 2 -> row0 (0)."""
    assert first_fit_rows([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]
    assert first_fit_rows([9, 1], 4) == [[0], [1]]  # over-budget item: a row of its own
    with pytest.raises(ValueError, match="budget"):
        first_fit_rows([1], 0)


def test_pack_sequences_places_every_token_once_with_restarting_positions():
    sequences = [[11, 12, 13, 14, 15], [21, 22], [31, 32, 33], [41]]
    ids, mask = right_padded(sequences)
    score = mask.clone()
    packed = pack_sequences(ids, mask, score, pad_token_id=0)
    # Budget = the longest sequence (5): rows [5], [3, 2] and [1] -> 3 rows of 5 instead of 4 rows of 5.
    assert packed.input_ids.shape == (3, 5)
    assert packed.real_tokens == 11
    flat_ids, flat_pos, flat_seg = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1), packed.segment_ids.reshape(-1)
    for s, seq in enumerate(sequences):
        where = (flat_seg == s).nonzero().squeeze(-1)
        assert flat_ids[where].tolist() == seq
        assert flat_pos[where].tolist() == list(range(len(seq)))
        assert packed.last_positions[s] == where[-1]
    # Scored: every token but each sequence's first, predicted by its left neighbour.
    assert len(packed.label_ids) == 11 - 4
    assert torch.equal(flat_ids[packed.predictor_positions + 1], packed.label_ids)
    assert (packed.branch_ids == 0).all()


def test_pack_sequences_rejects_left_padding():
    ids = torch.tensor([[0, 5, 6]])
    mask = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match="right-padded"):
        pack_sequences(ids, mask, mask)


def test_pack_pairs_lays_the_prompt_out_once_and_predicts_rejected_from_it():
    # Pair 0: prompt [1, 2], chosen [3, 4, 5], rejected [6]; pair 1: prompts differ -> two plain units.
    chosen = [[1, 2, 3, 4, 5], [7, 8, 9]]
    rejected = [[1, 2, 6], [7, 10, 11]]
    prompt_lengths = [2, 1]
    chosen_ids, chosen_mask = right_padded(chosen)
    rejected_ids, rejected_mask = right_padded(rejected)
    width = chosen_ids.shape[1]
    rejected_ids = torch.nn.functional.pad(rejected_ids, (0, width - rejected_ids.shape[1]))
    rejected_mask = torch.nn.functional.pad(rejected_mask, (0, width - rejected_mask.shape[1]))
    ids, mask = torch.cat([chosen_ids, rejected_ids]), torch.cat([chosen_mask, rejected_mask])
    completion = mask.clone()
    for row, p in enumerate(prompt_lengths + prompt_lengths):
        completion[row, :p] = 0
    # pair 1's rejected prompt is [7, 10] of length 2 (not [7]): not shareable.
    completion[3, :2] = 0
    packed = pack_pairs(ids, mask, completion, 2, pad_token_id=0)
    assert packed.real_tokens == 2 + 3 + 1 + 3 + 3  # pair 0 once as a tree (6), pair 1 as two sequences (6)
    flat_ids, flat_pos, flat_branch = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1), packed.branch_ids.reshape(-1)
    tree = (packed.segment_ids.reshape(-1) == 0).nonzero().squeeze(-1)
    assert flat_ids[tree].tolist() == [1, 2, 3, 4, 5, 6]
    assert flat_pos[tree].tolist() == [0, 1, 2, 3, 4, 2]  # rejected restarts after the prompt
    assert flat_branch[tree].tolist() == [0, 0, 1, 1, 1, 2]
    # The rejected token 6 (sequence 2) is predicted by the last prompt token (2), not by chosen's 5.
    (k,) = (packed.label_sequence == 2).nonzero().squeeze(-1).tolist()
    assert packed.label_ids[k] == 6 and flat_ids[packed.predictor_positions[k]] == 2
    assert (packed.branch_ids[packed.segment_ids > 0] == 0).all()  # the unshared pair is plain
    # Same scored tokens as the padded batch: completion tokens only.
    assert sorted(packed.label_ids.tolist()) == sorted([3, 4, 5, 6, 8, 9, 11])


def test_tree_mask_by_hand():
    """Row [p p c c r | pad]: chosen sees prompt + itself, rejected sees prompt + itself, never chosen."""
    segment = torch.tensor([[0, 0, 0, 0, 0, -1]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 0]])
    allowed = tree_attention_allowed(segment, branch)[0, 0].int()
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ])
    assert torch.equal(allowed, expected)
