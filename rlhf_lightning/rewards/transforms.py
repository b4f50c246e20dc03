"""Post-processing of sequence scores: running normalisation, missing-EOS penalty, clipping.

Order of operations, and why: (1) running statistics are updated with and applied to the *raw*
scores, so penalties never skew them; (2) completions cut by ``max_new_tokens`` are penalised, in
normalised units, so one penalty value works for any reward scale; (3) the result is clipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["RunningMoments", "RewardTransform"]

_NORMALIZE = ("none", "scale", "whiten")


class RunningMoments(nn.Module):
    """Running count, mean and (population) variance of a scalar stream, in float64 buffers.

    Buffers are part of ``state_dict``, so statistics survive checkpoint and resume. Under
    ``torch.distributed``, batch moments are all-reduced first, so every rank keeps identical stats.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("var", torch.ones((), dtype=torch.float64))

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        """Fold a batch into the statistics (Chan et al.'s parallel merge of moments)."""
        values = values.detach().reshape(-1).to(torch.float64)
        # [n, sum, sum of squares], summed over ranks before merging.
        count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
        batch = torch.stack([count, values.sum(), values.square().sum()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch)
        n, total, total_sq = batch.to(self.mean.device).unbind()
        if n == 0:
            return
        batch_mean = total / n
        batch_var = (total_sq / n - batch_mean.square()).clamp(min=0.0)
        new_count = self.count + n
        delta = batch_mean - self.mean
        old_m2 = self.var * self.count
        m2 = old_m2 + batch_var * n + delta.square() * self.count * n / new_count
        self.mean.copy_(self.mean + delta * n / new_count)
        self.var.copy_(m2 / new_count)
        self.count.copy_(new_count)


class RewardTransform(nn.Module):
    """Turn raw sequence scores into the rewards PPO optimises.

    Args:
        normalize: ``"none"``; ``"scale"`` divides by the running std (keeps the sign of scores);
            ``"whiten"`` subtracts the running mean and divides by the running std.
        clip: clip the result to ``[-clip, clip]``; None disables.
        missing_eos_penalty: subtracted from the score of completions without EOS/stop token
            (truncated by ``max_new_tokens``); applied after normalisation.
        missing_eos_score: instead of a penalty, *replace* such scores with this value.
        eps: added to the std before dividing.
        warmup: until the running statistics hold this many scores, the std used is at least 1, so
            normalisation may shrink rewards but never amplify them: one rollout is a poor estimate
            of the spread (a first batch of equal scores has std 0). Scores whose spread is >= 1
            are normalised exactly as without warm-up.
        min_std: floor on the running std used for dividing, so a spread that collapses (every
            completion scored the same) never multiplies rewards by ``1 / eps``. Default 1e-2 (at
            most a 100x magnification); set it near the smallest score spread that is meaningful.

    Statistics are updated on every call in training mode (or when ``update=True`` is passed) and
    are saved in ``state_dict`` (assign the transform to a LightningModule attribute and Lightning
    checkpoints them).
    """

    def __init__(
        self,
        *,
        normalize: str = "none",
        clip: float | None = None,
        missing_eos_penalty: float | None = None,
        missing_eos_score: float | None = None,
        eps: float = 1e-8,
        warmup: int = 64,
        min_std: float = 1e-2,
    ) -> None:
        super().__init__()
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be > 0 (or None to disable), got {clip}")
        if missing_eos_penalty is not None and missing_eos_score is not None:
            raise ValueError("Set at most one of missing_eos_penalty (subtract) and missing_eos_score (replace).")
        self.normalize = normalize
        self.clip = clip
        self.missing_eos_penalty = missing_eos_penalty
        self.missing_eos_score = missing_eos_score
        if warmup < 0 or min_std < 0:
            raise ValueError(f"warmup and min_std must be >= 0, got warmup={warmup}, min_std={min_std}")
        self.eps = eps
        self.warmup = warmup
        self.min_std = min_std
        self.moments = RunningMoments()

    def forward(self, scores: torch.Tensor, *, finished: torch.Tensor | None = None, update: bool | None = None) -> torch.Tensor:
        """Args: ``scores (N,)``, ``finished (N,)`` bool (needed by the EOS options), ``update`` (default:
        ``self.training``). Returns ``(N,)`` float32."""
        scores = scores.detach().float()
        if self.normalize != "none":
            if self.training if update is None else update:
                self.moments.update(scores)
            std = self.moments.std.to(scores.device, torch.float32)
            # Warm-up: a spread estimated from few scores may shrink rewards but never amplify them.
            floor = 1.0 if self.moments.count < self.warmup else self.min_std
            std = std.clamp(min=floor) + self.eps
            if self.normalize == "whiten":
                scores = (scores - self.moments.mean.to(scores.device, torch.float32)) / std
            else:
                scores = scores / std
        if self.missing_eos_penalty is not None or self.missing_eos_score is not None:
            if finished is None:
                raise ValueError("The missing-EOS options need `finished` (N,) bool.")
            unfinished = ~finished.to(scores.device).bool()
            if self.missing_eos_score is not None:
                scores = torch.where(unfinished, torch.full_like(scores, self.missing_eos_score), scores)
            else:
                scores = scores - self.missing_eos_penalty * unfinished.float()
        if self.clip is not None:
            scores = scores.clamp(-self.clip, self.clip)
        return scores

    def extra_repr(self) -> str:
        return (
            f"normalize={self.normalize!r}, clip={self.clip}, missing_eos_penalty={self.missing_eos_penalty}, "
            f"missing_eos_score={self.missing_eos_score}, warmup={self.warmup}, min_std={self.min_std}"
        )
