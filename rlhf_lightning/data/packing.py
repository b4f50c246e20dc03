"""Padding-free batches: sequences packed into rows under a token budget, and the shared-prompt tree.

A right-padded batch of S sequences ``(S, T)`` spends compute on ``S * T - sum(lengths)`` pad tokens.
Packing moves the real tokens into R <= S rows of L tokens each, first-fit decreasing under a token
budget (so a row never grows past the longest unit: attention over a packed row stays bounded — on CPU a
masked SDPA pays for the whole ``L x L`` square). Every sequence keeps its own ``position_ids``
(restarting at 0), and :func:`packed_attention_mask` stops attention at sequence boundaries.

A *unit* is what goes into a row unsplit: one sequence (padding-free), or one preference pair laid out as
a tree (shared prompt): ``[prompt, chosen completion, rejected completion]`` where both completions
attend to the prompt and not to each other, the rejected completion's positions restarting where the
prompt ends. The prompt is then computed once per pair instead of twice.

Scoring is described token by token, so every layout (padded, packed, tree) is scored by the same
gather: scored token ``j`` has its label id, the flat position (in ``R * L``) of the token whose logits
predict it, and the sequence it belongs to. In the tree, the first token of the rejected completion is
predicted by the last prompt token, which is not its neighbour in the row — hence explicit predictors.

The plan is made on the host from the sequence lengths (one device-to-host copy of the lengths per
packed forward); the tokens are moved into the rows on the batch's device.

Notation: S sequences, T padded length, R packed rows, L row length, N scored tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["PackedBatch", "first_fit_rows", "pack_episodes", "pack_sequences", "pack_pairs", "tree_attention_allowed"]


class PackedBatch(NamedTuple):
    """Sequences packed into rows, and how to read per-sequence values back.

    Fields:
        input_ids: ``(R, L)`` packed token ids (``pad_token_id`` after each row's last unit).
        position_ids: ``(R, L)`` position of each token within its own sequence (0 on row padding).
        segment_ids: ``(R, L)`` unit id of each token; ``-1`` on row padding. Attention never crosses units.
        branch_ids: ``(R, L)`` 0 on tokens every sequence of the unit sees (a whole sequence, or the shared
            prompt), ``b >= 1`` on branch ``b`` (chosen = 1, rejected = 2), which only its own branch sees.
        label_ids: ``(N,)`` token ids of the scored tokens.
        predictor_positions: ``(N,)`` flat index into ``R * L`` of the token whose logits predict each label.
        label_sequence: ``(N,)`` which of the S source sequences each scored token belongs to.
        last_positions: ``(S,)`` flat index of each sequence's last real token (where a reward head reads).
        num_sequences: S.
        real_tokens: number of non-pad tokens in the rows (tokens computed for a reason).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    branch_ids: torch.Tensor
    label_ids: torch.Tensor
    predictor_positions: torch.Tensor
    label_sequence: torch.Tensor
    last_positions: torch.Tensor
    num_sequences: int
    real_tokens: int

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def row_length(self) -> int:
        return self.input_ids.shape[1]

    def attention_allowed(self) -> torch.Tensor:
        """``(R, 1, L, L)`` bool: True where query token q may attend to key token k (see
        :func:`tree_attention_allowed`)."""
        return tree_attention_allowed(self.segment_ids, self.branch_ids)


def tree_attention_allowed(segment_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """``(R, 1, L, L)`` bool mask of a packed batch: q attends to k iff both are in the same unit, k is
    not after q, and k is shared (branch 0) or on q's own branch.

    Row padding (segment -1) attends causally to earlier padding only, so no query row is empty (an
    all-False row would give NaN in SDPA, and NaN times a zero mask is still NaN).
    """
    length = segment_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_unit = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, Lq, Lk)
    visible_branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    return (same_unit & visible_branch & causal).unsqueeze(1)


def first_fit_rows(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Assign items of the given lengths to rows of capacity ``budget``, first-fit decreasing.

    Items are taken longest first and put in the first row with room (ties keep input order, so the
    result is deterministic). An item longer than ``budget`` gets a row of its own.

    Returns:
        rows, each a list of item indices in the order they sit in the row.
    """
    if budget < 1:
        raise ValueError(f"the row token budget must be >= 1, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


# A unit piece: (source sequence s, first column, end column, branch). A piece's tokens are columns
# [start, end) of source row s, at positions start..end-1 (right padding: column == position).
_Piece = tuple[int, int, int, int]


def _pack_units(
    units: list[list[_Piece]],
    shared: dict[int, tuple[int, int]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    lengths: list[int],
    *,
    max_tokens: int | None,
    pad_token_id: int,
) -> PackedBatch:
    """Lay the units out in rows and build every index. ``shared[s] = (s', n)``: the first n columns of
    sequence s are the same tokens as those of s' (laid out once, in s')."""
    device = input_ids.device
    num_seq, width = input_ids.shape
    unit_lengths = [sum(end - start for _, start, end, _ in unit) for unit in units]
    budget = max(max(unit_lengths, default=1), max_tokens or 0, 1)
    rows = first_fit_rows(unit_lengths, budget)
    row_length = max(sum(unit_lengths[u] for u in row) for row in rows) if rows else 1
    # Where column c of source sequence s sits in the packed rows (flat index), -1 = nowhere.
    flat = torch.full((num_seq, width), -1, dtype=torch.long)
    segment = torch.full((len(rows), row_length), -1, dtype=torch.long)
    branch = torch.zeros((len(rows), row_length), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for u in row:
            start_of_unit = offset
            for s, start, end, b in units[u]:
                n = end - start
                flat[s, start:end] = torch.arange(r * row_length + offset, r * row_length + offset + n)
                branch[r, offset : offset + n] = b
                offset += n
            segment[r, start_of_unit:offset] = u
    for s, (source, n) in shared.items():
        flat[s, :n] = flat[source, :n]
    real = flat >= 0
    # Scored tokens: column c >= 1 of sequence s, in its score mask; predicted by column c - 1.
    scored = score_mask.detach().to("cpu", torch.bool) & attention_mask.detach().to("cpu", torch.bool)
    scored[:, 0] = False
    seq_index, col_index = scored.nonzero(as_tuple=True)
    predictor = flat[seq_index, col_index - 1]
    if (predictor < 0).any() or (flat[seq_index, col_index] < 0).any():
        raise ValueError("a scored token is outside the packed rows: the masks disagree with the sequence lengths")
    last = flat[torch.arange(num_seq), torch.tensor(lengths).clamp(min=1) - 1]

    # Scatter the real tokens into the rows (on the batch's device).
    real_dev, flat_dev = real.to(device), flat.to(device)
    targets = flat_dev[real_dev]
    packed_ids = torch.full((len(rows) * row_length,), pad_token_id, dtype=input_ids.dtype, device=device)
    packed_ids[targets] = input_ids[real_dev]
    positions = torch.zeros(len(rows) * row_length, dtype=torch.long, device=device)
    positions[targets] = torch.arange(width, device=device).expand(num_seq, width)[real_dev]
    return PackedBatch(
        input_ids=packed_ids.view(len(rows), row_length),
        position_ids=positions.view(len(rows), row_length),
        segment_ids=segment.to(device),
        branch_ids=branch.to(device),
        label_ids=input_ids[seq_index.to(device), col_index.to(device)],
        predictor_positions=predictor.to(device),
        label_sequence=seq_index.to(device),
        last_positions=last.to(device),
        num_sequences=num_seq,
        real_tokens=int((segment >= 0).sum()),
    )


def _lengths(attention_mask: torch.Tensor) -> list[int]:
    lengths = attention_mask.sum(dim=-1)
    if not bool((attention_mask.cumsum(dim=-1) == torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)).eq(
        attention_mask.bool()
    ).all()):
        raise ValueError("packing needs right-padded sequences (attention_mask 1...1 0...0 per row)")
    return lengths.tolist()


def pack_sequences(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor,
    *,
    max_tokens: int | None = None,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack a right-padded batch ``(S, T)`` padding-free: one unit per sequence.

    Args:
        input_ids / attention_mask: ``(S, T)`` right padded.
        score_mask: ``(S, T)`` 1 on the tokens to score (e.g. the completion mask); column 0 is never
            scored (nothing predicts it).
        max_tokens: row budget; ``None`` (or anything smaller than the longest sequence) = the longest
            sequence, so no row is longer than the padded batch's rows.
        pad_token_id: id of the padding after each row's last sequence.
    """
    lengths = _lengths(attention_mask)
    units = [[(s, 0, n, 0)] for s, n in enumerate(lengths) if n > 0]
    return _pack_units(units, {}, input_ids, attention_mask, score_mask, lengths, max_tokens=max_tokens, pad_token_id=pad_token_id)


def pack_pairs(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    num_pairs: int,
    *,
    shared_prompt: bool = True,
    max_tokens: int | None = None,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack a concatenated preference batch (rows ``[:B]`` chosen, ``[B:]`` rejected, ``(2B, T)`` right
    padded) into rows; sequence ``s`` of the result is row ``s`` of the input.

    With ``shared_prompt``, each pair is one tree unit ``[prompt, chosen completion, rejected completion]``
    (the prompt computed once); a pair whose two prompts differ (ids or length) is packed as two plain
    sequences instead. Without it, every sequence is its own unit (padding-free only).

    Args:
        completion_mask: ``(2B, T)`` 1 on completion tokens; the prompt is everything before the first one.
        max_tokens: row budget; ``None`` = the longest unit.
    """
    if not shared_prompt:
        return pack_sequences(input_ids, attention_mask, completion_mask, max_tokens=max_tokens, pad_token_id=pad_token_id)
    lengths = _lengths(attention_mask)
    prompt_mask = attention_mask.bool() & ~completion_mask.bool()
    prompt_lengths = prompt_mask.sum(dim=-1)
    b = num_pairs
    same_ids = ((input_ids[:b] == input_ids[b:]) | ~prompt_mask[:b]).all(dim=-1)
    shareable = (same_ids & (prompt_lengths[:b] == prompt_lengths[b:])).tolist()
    prompt_lengths = prompt_lengths.tolist()
    units: list[list[_Piece]] = []
    shared: dict[int, tuple[int, int]] = {}
    for i in range(b):
        chosen, rejected, p = i, b + i, prompt_lengths[i]
        if shareable[i] and p > 0:
            units.append([(chosen, 0, p, 0), (chosen, p, lengths[chosen], 1), (rejected, p, lengths[rejected], 2)])
            shared[rejected] = (chosen, p)
        else:
            units.extend([[(s, 0, lengths[s], 0)] for s in (chosen, rejected) if lengths[s] > 0])
    return _pack_units(units, shared, input_ids, attention_mask, completion_mask, lengths, max_tokens=max_tokens, pad_token_id=pad_token_id)


def pack_episodes(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    max_tokens: int | None = None,
    pad_token_id: int = 0,
) -> PackedBatch:
    """Pack on-policy episodes (a LEFT-padded prompt + a RIGHT-padded completion, ``(S, T)``) padding-free.

    Each row's real tokens are one contiguous span; it is moved to column 0 and packed as
    :func:`pack_sequences` does, scoring the completion tokens. The scored tokens come out in row-major
    order of the original layout, so the shifted-grid mask ``completion_mask[:, 1:] * attention_mask[:, 1:]``
    (a rollout's ``mask``) selects exactly the places they go back to: ``out[mask.bool()] = values``.

    Raises:
        ValueError: a row's real tokens are not contiguous, or a completion token has no prompt token
            before it (the padded forward would score it from a pad position).
    """
    num_seq, width = attention_mask.shape
    real = attention_mask.bool()
    lengths = real.sum(dim=-1)
    first = real.long().argmax(dim=-1)  # (S,) left padding of each row
    columns = torch.arange(width, device=input_ids.device)
    in_span = (columns >= first[:, None]) & (columns < (first + lengths)[:, None])
    if not bool((in_span == real).all()):
        raise ValueError(
            "packing episodes needs each row's real tokens in one span (left-padded prompt, right-padded completion)"
        )
    source = (columns[None, :] + first[:, None]).clamp(max=width - 1)  # (S, T) column each new column comes from
    aligned_mask = (columns[None, :] < lengths[:, None]).long()
    aligned_ids = torch.where(aligned_mask.bool(), input_ids.gather(1, source), pad_token_id)
    aligned_scores = completion_mask.gather(1, source) * aligned_mask
    if bool((aligned_scores[:, 0] > 0).any()):
        raise ValueError("an episode's completion starts at its first real token: it needs at least one prompt token")
    return pack_sequences(aligned_ids, aligned_mask, aligned_scores, max_tokens=max_tokens, pad_token_id=pad_token_id)
