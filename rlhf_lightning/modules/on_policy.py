"""What every on-policy method shares: the rollout, the minibatch update loop, logging, validation.

:class:`OnPolicyModuleBase` is the common part of :class:`~rlhf_lightning.modules.ppo.PPOModule` (with a
critic) and :class:`~rlhf_lightning.modules.policy_gradient.PolicyGradientModule` (GRPO, Dr. GRPO, DAPO,
GSPO, RLOO, REINFORCE++, ReMax; no critic). One Lightning training step = one rollout: the subclass's
``training_step`` collects it (:meth:`collect`), computes its advantages, and hands them to
:meth:`policy_update`, which runs ``ppo_epochs`` x minibatches of optimizer steps with manual
optimization and calls the subclass's :meth:`minibatch_loss` on each minibatch. The subclass's formulas
all come from :mod:`rlhf_lightning.losses`.

Hooks for callbacks (docs/CONTRACTS_INTERNAL.md): ``policy`` (the HF causal LM), ``reference``,
``kl_coef`` (set by ``FixedKLController`` / ``AdaptiveKLController``), ``last_rollout_kl`` /
``last_rollout_size`` (read by those callbacks), ``value_model`` (the trainable critic or value head, None
without one: ``ElasticReset(reset_critic=True)`` resets it), ``export_model()``.

Shared options and where they depart from the papers:

* Only the last inner optimizer step of a rollout goes through ``LightningOptimizer.step`` (the others go
  straight to ``strategy.optimizer_step``, the same precision path): Lightning counts every
  ``LightningOptimizer.step`` as a global step, and here ``global_step`` must count rollouts.
* ``kl_threshold`` (early stop): at the end of each epoch over the rollout, if the mean ``approx_kl``
  (k3 estimate of KL(pi_old || pi), measured on each minibatch before its step) exceeds the threshold, the
  remaining epochs are skipped. Checked per epoch, not per minibatch as in some implementations, so the
  step that ends the rollout is always known before it is taken (it is the counted one).
* ``ptx_coef`` (InstructGPT's PPO-ptx, Ouyang et al. 2022 eq. 2): every inner step adds
  ``ptx_coef * NLL`` of the next batch of an SFT DataModule (``ptx_data``, cycled) to the RL loss. The
  paper mixes in pretraining data; any demonstration set works here. Every rank reads the same SFT
  batches (no distributed sampler): with small ``ptx_coef`` this only wastes a little diversity.
* Sampling and minibatch order are seeded from ``(seed, rank, global_step)``, so a run resumed from a
  checkpoint draws exactly the rollouts an uninterrupted run would.
* Statistics that normalise over "the batch" (advantage / reward whitening) are all-reduced across ranks,
  so data-parallel training normalises as one large batch does.
* The frozen reference is not stored in checkpoints (it is rebuilt from ``reference`` / ``policy``).
* ``padding_free`` (default on): the rollout's old-log-prob / value / reference forwards and every update
  forward run over the episodes packed into rows without padding (``rollout.policy_forward``), with the
  output layer only at the completion's positions; results are scattered back to the padded ``(N, T')``
  grid, so losses, GAE and masks are those of the padded path (equal within float tolerance). The
  ``ptx_coef`` SFT batches are packed as ``SFTModule`` packs them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict
from typing import Any, Callable, Iterator, Mapping

import torch
from lightning.pytorch.utilities import rank_zero_info

from rlhf_lightning.evaluation import evaluate_policy
from rlhf_lightning.generation import SamplingConfig
from rlhf_lightning.logprobs import causal_lm_logprobs
from rlhf_lightning.losses import (
    kl_penalty,
    masked_mean,
    masked_moment_sums,
    mean_var_from_moment_sums,
    whiten,
)
from rlhf_lightning.data.packing import pack_sequences
from rlhf_lightning.models import ModelSpecArg, build_reference, load_causal_lm, prepare_trainable
from rlhf_lightning.modules.base import RLHFModuleBase
from rlhf_lightning.modules.optim import Optimization
from rlhf_lightning.modules.packed_forward import packed_logprobs, packing_mode
from rlhf_lightning.rewards import EnsembleRewardSource, GoldRewardSource, RewardTransform
from rlhf_lightning.rollout import PolicyForward, Rollout, collect_rollout, policy_forward
from rlhf_lightning.strategies import clip_gradient_norm, set_deepspeed_gradient_clipping

__all__ = ["OnPolicyModuleBase"]


def _no_closure() -> None:
    return None


class OnPolicyModuleBase(RLHFModuleBase):
    """Base of on-policy modules; subclasses call :meth:`_init_on_policy` from ``__init__`` and implement
    ``policy``, ``training_step`` and :meth:`minibatch_loss`."""

    kl_coef: float
    checkpoint_key = "ppo"  # where kl_coef is saved in checkpoints

    def _init_on_policy(
        self,
        *,
        policy: ModelSpecArg,
        tokenizer: str | None,
        reference: ModelSpecArg | None,
        reward: Callable | Mapping[str, Callable] | None,
        sampling: SamplingConfig | Mapping[str, Any] | None,
        ppo_epochs: int,
        num_minibatches: int,
        minibatch_size: int | None,
        kl_coef: float,
        kl_estimator: str,
        entropy_coef: float,
        max_grad_norm: float | None,
        reward_transform: RewardTransform | None,
        forward_batch_size: int | None,
        gold_objectives: list[str] | None,
        val_num_samples: int,
        log_samples_every_n_steps: int,
        num_logged_samples: int,
        seed: int,
        optim: Optimization | None,
        dtype: str | None,
        kl_threshold: float | None = None,
        ptx_coef: float = 0.0,
        ptx_data: Any = None,
        padding_free: bool = True,
        max_row_tokens: int | None = None,
        peft: Mapping[str, Any] | None = None,
        disable_dropout: bool = True,
        gradient_checkpointing: bool = False,
    ) -> torch.nn.Module:
        """Set the shared attributes, load the tokenizer, the policy LM and the frozen reference.

        Returns the policy LM (the subclass decides whether a value head goes on it)."""
        if kl_threshold is not None and kl_threshold <= 0:
            raise ValueError(f"kl_threshold must be > 0 or None, got {kl_threshold}")
        if ptx_coef < 0:
            raise ValueError(f"ptx_coef must be >= 0, got {ptx_coef}")
        if ptx_coef > 0 and ptx_data is None:
            raise ValueError("ptx_coef > 0 needs ptx_data: an SFT DataModule (e.g. DemonstrationDataModule)")
        # Many optimizer steps per rollout (ppo_epochs x minibatches): manual optimization.
        self.automatic_optimization = False
        self.optim = optim or Optimization()
        self.sampling = sampling if isinstance(sampling, SamplingConfig) else SamplingConfig(**(sampling or {}))
        self.ppo_epochs = ppo_epochs
        self.num_minibatches = num_minibatches
        self.minibatch_size = minibatch_size
        self.kl_coef = float(kl_coef)
        self.kl_estimator = kl_estimator
        self.entropy_coef = entropy_coef
        self.max_grad_norm = max_grad_norm
        self.forward_batch_size = forward_batch_size
        self.gold_objectives = list(gold_objectives or [])
        self.val_num_samples = val_num_samples
        self.log_samples_every_n_steps = log_samples_every_n_steps
        self.num_logged_samples = num_logged_samples
        self.seed = seed
        self.kl_threshold = kl_threshold
        self.ptx_coef = float(ptx_coef)
        self.ptx_data = ptx_data
        self.padding_free = padding_free
        self.max_row_tokens = max_row_tokens
        self._ptx_batches: Iterator[Mapping[str, torch.Tensor]] | None = None
        # Read by the KL controller callbacks after each training step (see callbacks/kl_control.py).
        self.last_rollout_kl: torch.Tensor | float | None = None
        self.last_rollout_size = 0

        self.reward_fn = EnsembleRewardSource(list(reward.values()), "mean") if isinstance(reward, Mapping) else reward
        self.reward_transform = reward_transform  # an nn.Module: its running stats are checkpointed

        self._init_tokenizer(tokenizer, policy)
        lm = prepare_trainable(
            load_causal_lm(policy, tokenizer=self.tokenizer, dtype=dtype),
            peft=peft, no_dropout=disable_dropout, gradient_checkpointing=gradient_checkpointing,
        )
        # A named reference, else the LoRA policy with adapters off, else a frozen copy of the policy.
        self.ref_model = build_reference(lm, reference, tokenizer=self.tokenizer, dtype=dtype)
        self.critic: torch.nn.Module | None = None  # a subclass with a separate critic assigns it
        return lm

    # ------------------------------------------------------------------------------------------ hooks

    @property
    def reference(self) -> torch.nn.Module | None:
        return self.ref_model

    @property
    def value_model(self) -> torch.nn.Module | None:
        """The trainable value estimator (a value head or a separate critic), None for critic-free methods."""
        return None

    @property
    def sampling_temperature(self) -> float:
        """Temperature of the rollout log-probs (greedy decoding has none: 1)."""
        return self.sampling.temperature if self.sampling.do_sample else 1.0

    def on_fit_start(self) -> None:
        # from_pretrained returns eval-mode models and Lightning keeps module modes as they are.
        self.train()
        super().on_fit_start()  # puts the reference back in eval mode

    def configure_model(self) -> None:
        super().configure_model()
        # Manual optimization: under DeepSpeed only the engine can clip (see strategies.clip_gradient_norm).
        set_deepspeed_gradient_clipping(self, self.max_grad_norm)

    # ------------------------------------------------------------------------------------- the rollout

    def _step_seed(self) -> int:
        return ((self.seed * 1_000_003 + self.global_rank) * 1_000_003 + self.global_step) % (2**63)

    def collect(self, prompt_batch: Mapping[str, Any], *, seed_offset: int = 0) -> Rollout:
        """Sample, score and record old log-probs / ref log-probs / values for one prompt batch (no grad).

        ``seed_offset`` gives a further rollout of the same step its own sampling seed (e.g. refills)."""
        if self.reward_fn is None:
            raise ValueError(f"{type(self).__name__} has no reward: pass `reward=` or assign `self.reward_fn`.")
        return collect_rollout(
            self.model,
            self.ref_model,
            self.tokenizer,
            prompt_batch,
            reward_fn=self.reward_fn,
            sampling=self.sampling,
            value_model=self.critic,
            reward_transform=self.reward_transform,
            forward_batch_size=self.forward_batch_size,
            seed=(self._step_seed() + seed_offset) % (2**63),
            padding_free=self.padding_free,
            max_row_tokens=self.max_row_tokens,
        )

    def rollout_kl(self, rollout: Rollout) -> torch.Tensor:
        """``(N, T')`` per-token KL estimate (``kl_estimator``) on the shifted grid, 0 off-mask."""
        kl = kl_penalty(rollout.logprobs, rollout.ref_logprobs, kind=self.kl_estimator)
        return torch.where(rollout.mask.bool(), kl, torch.zeros_like(kl))

    def global_mean_var(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """Masked mean and unbiased variance over every rank's ``values`` (``(None, None)`` on one process:
        the pure functions then use the tensor's own statistics, the same numbers)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None, None
        sums = self.trainer.strategy.reduce(masked_moment_sums(values, mask), reduce_op="sum")
        return mean_var_from_moment_sums(sums)

    def _whiten(self, values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
        mean, var = self.global_mean_var(values, mask)
        return whiten(values, mask, shift_mean=shift_mean, mean=mean, var=var)

    # -------------------------------------------------------------------------------------- the update

    def _minibatches(self, n: int, generator: torch.Generator):
        size = self.minibatch_size or math.ceil(n / self.num_minibatches)
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, size):
                yield order[start : start + size]

    def _optimizer_step(self, optimizer, *, last: bool) -> None:
        if last:
            optimizer.step()  # counted: one global step per rollout
        else:
            self.trainer.strategy.optimizer_step(optimizer.optimizer, _no_closure, model=self)

    def minibatch_loss(
        self, out: PolicyForward, rollout: Rollout, rows: torch.Tensor, width: int, targets: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss on one minibatch (without entropy bonus and ptx term, added by the loop).

        Args:
            out: the policy forward of the minibatch (``(M, W-1)`` log-probs, mask, values, entropy).
            rollout: the whole rollout; the minibatch is ``rows``, its columns ``[:width - 1]`` on the
                shifted grid (trailing all-padding columns dropped).
            rows: ``(M,)`` row indices.
            width: kept columns of ``input_ids``.
            targets: what ``training_step`` passed to :meth:`policy_update` (advantages, returns, ...).

        Returns:
            ``(loss, stats)``; ``stats`` maps logged metric names to detached scalars and must hold
            ``policy/approx_kl`` (read by ``kl_threshold``).
        """
        raise NotImplementedError

    def updates_policy(self) -> bool:
        """Whether this rollout's update trains the policy (False during PPO's critic warm-up: then the
        entropy bonus and the ptx term are left out too)."""
        return True

    def _ptx_loss(self) -> torch.Tensor:
        """NLL of the next SFT batch (``ptx_data``, cycled forever)."""
        if self._ptx_batches is None:
            self._ptx_batches = self._cycle_ptx()
        batch = next(self._ptx_batches)
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        score_mask = batch["completion_mask"] * batch["attention_mask"]
        if self.padding_free and packing_mode(self.policy) is not None:  # as SFTModule packs the same batches
            pad = getattr(self.tokenizer, "pad_token_id", None)
            packed = pack_sequences(
                batch["input_ids"], batch["attention_mask"], score_mask, max_tokens=self.max_row_tokens,
                pad_token_id=int(pad) if pad is not None else 0,
            )
            out = packed_logprobs(self.policy, packed)
            return -out.token_logps.sum() / out.tokens.sum().clamp(min=1.0)
        out = causal_lm_logprobs(self.policy, batch["input_ids"], batch["attention_mask"], score_mask)
        return -out.tokens.sum() / out.mask.sum().clamp(min=1.0)

    def _cycle_ptx(self) -> Iterator[Mapping[str, torch.Tensor]]:
        if getattr(self.ptx_data, "_tokenizer", None) is None and getattr(self.ptx_data, "tokenizer_name", None) is None:
            self.ptx_data.set_tokenizer(self.tokenizer)
        self.ptx_data.setup("fit")
        while True:
            yielded = False
            for batch in self.ptx_data.train_dataloader():
                yielded = True
                yield batch
            if not yielded:
                raise ValueError("ptx_data has no training batches")

    def policy_update(self, rollout: Rollout, targets: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` x minibatches of optimizer steps on :meth:`minibatch_loss`; returns mean statistics."""
        optimizer = self.optimizers()
        generator = torch.Generator().manual_seed(self._step_seed())
        batches = list(self._minibatches(len(rollout), generator))
        per_epoch = len(batches) // self.ppo_epochs
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        entropy_batches = 0
        epoch_kl = torch.zeros((), device=self.device)
        executed = 0
        for i, rows in enumerate(batches):
            rows = rows.to(rollout.input_ids.device)
            attention_mask = rollout.attention_mask[rows]
            # Drop columns that are padding in every row of the minibatch (prompts are left padded,
            # completions right padded, so only trailing columns can go).
            width = int(attention_mask.sum(0).nonzero().max()) + 1
            mask = rollout.mask[rows, : width - 1]
            want_entropy = self.entropy_coef > 0 or i * self.ppo_epochs < len(batches)  # first epoch only
            out = policy_forward(
                self.model,
                rollout.input_ids[rows, :width],
                attention_mask[:, :width],
                rollout.completion_mask[rows, :width],
                temperature=self.sampling_temperature,
                value_model=self.critic,
                return_entropy=want_entropy,
                padding_free=self.padding_free,
                max_row_tokens=self.max_row_tokens,
            )
            loss, stats = self.minibatch_loss(out, rollout, rows, width, targets)
            updates_policy = self.updates_policy()
            if out.entropy is not None:
                entropy = masked_mean(out.entropy, mask)
                if self.entropy_coef > 0 and updates_policy:
                    loss = loss - self.entropy_coef * entropy
                sums["entropy"] += entropy.detach()
                entropy_batches += 1
            if self.ptx_coef > 0 and updates_policy:
                ptx_loss = self._ptx_loss()
                loss = loss + self.ptx_coef * ptx_loss
                sums["loss/ptx"] += ptx_loss.detach()
            epoch_kl += stats["policy/approx_kl"]
            stop = False
            if self.kl_threshold is not None and (i + 1) % per_epoch == 0:
                stop = bool(epoch_kl / per_epoch > self.kl_threshold)
                epoch_kl = torch.zeros((), device=self.device)
            last = i == len(batches) - 1 or stop
            self.manual_backward(loss)
            if self.max_grad_norm is not None:
                clip_gradient_norm(self, optimizer, self.max_grad_norm)
            self._optimizer_step(optimizer, last=last)
            optimizer.zero_grad(set_to_none=True)
            for name, value in stats.items():
                sums[name] += value
            executed += 1
            if last:
                break
        result = {name: value / executed for name, value in sums.items() if name != "entropy"}
        if entropy_batches:
            result["entropy"] = sums["entropy"] / entropy_batches
        if self.kl_threshold is not None:
            result["policy/epochs"] = torch.tensor(executed / per_epoch, device=self.device)
        return result

    def finish_rollout(self, rollout: Rollout, metrics: Mapping[str, Any]) -> None:
        """After the update: step the LR schedule (once per rollout), log ``metrics``, show samples."""
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        for name, value in metrics.items():
            self.log(
                name, value, on_step=True, on_epoch=False, batch_size=len(rollout), sync_dist=True,
                prog_bar=name in ("reward/raw", "kl"),
            )
        if self.log_samples_every_n_steps and (self.global_step - 1) % self.log_samples_every_n_steps == 0:
            self.log_samples(rollout)

    # ------------------------------------------------------------------------------------------ logging

    def log_samples(self, rollout: Rollout) -> None:
        """A few prompt / completion / score rows: a text table where the logger has one, else printed."""
        if not self.trainer.is_global_zero:
            return
        n = min(self.num_logged_samples, len(rollout))
        rows = [[rollout.prompt_text[i], rollout.completion_text[i], float(rollout.raw_scores[i])] for i in range(n)]
        columns = ["prompt", "completion", "score"]
        logged = False
        for logger in self.loggers:
            if hasattr(logger, "log_text"):  # e.g. WandbLogger
                logger.log_text(key="samples", columns=columns, data=rows, step=self.global_step)
                logged = True
            elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
                table = "| prompt | completion | score |\n|---|---|---|\n" + "\n".join(
                    f"| {p} | {c} | {s:.3f} |" for p, c, s in rows
                )
                logger.experiment.add_text("samples", table, self.global_step)
                logged = True
        if not logged:
            lines = "\n".join(f"  [{s:+.3f}] {p!r} -> {c!r}" for p, c, s in rows)
            rank_zero_info(f"{type(self).__name__} samples at step {self.global_step}:\n{lines}")

    # --------------------------------------------------------------------------------------- validation

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        scorers: dict[str, Any] = {f"gold/{name}": GoldRewardSource(name) for name in self.gold_objectives}
        if self.reward_fn is not None:
            scorers["reward"] = self.reward_fn
        sampling = asdict(self.sampling)
        result = evaluate_policy(
            self.policy,
            self.tokenizer,
            list(batch["prompt_text"]),
            scorers=scorers,
            reference=self.ref_model,
            num_samples=self.val_num_samples,
            max_new_tokens=sampling["max_new_tokens"],
            temperature=sampling["temperature"],
            top_k=sampling["top_k"],
            top_p=sampling["top_p"],
            do_sample=sampling["do_sample"],
            batch_size=len(batch["prompt_text"]),
            seed=self.seed + batch_idx,
        )
        names = {f"score/{key}": key for key in scorers} | {"kl_to_reference": "kl_to_reference", "response_length": "response_length"}
        for metric, name in names.items():
            if metric in result.metrics:
                self.log(f"val/{name}", result.metrics[metric], batch_size=len(result.samples), sync_dist=True)

    # ------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[self.checkpoint_key] = {"kl_coef": self.kl_coef}  # the state dict leaves the frozen reference out (base)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.checkpoint_key in checkpoint:  # a KL controller callback, if any, re-applies its own restored value
            self.kl_coef = float(checkpoint[self.checkpoint_key]["kl_coef"])
