"""The FSDP2 sharding plan of rlhf_lightning.strategies, in one process (a world of size 1 over gloo).

Sharding over one rank keeps every tensor whole, but every FSDP2 code path runs: units, hooks, DTensor
parameters, the root's lazy init, gathering for ``generate``, gradient reduction. These tests check the
plan's structure and that every call path our modules use (plain forward, the value-head wrapper's
``values`` / ``generate`` on the inner LM, the reward model's backbone + head) gives the unsharded
model's numbers; the 2-rank equivalence is in test_strategy_parity.py.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from rlhf_lightning.generation import generate
from rlhf_lightning.models import CausalLMWithValueHead, load_causal_lm, load_reward_model, reward_model_scores
from rlhf_lightning.strategies import (
    FSDP2Plan,
    _leaf_units,
    _qualified_name,
    apply_fsdp2,
    full_state_dict,
    is_fsdp2_sharded,
    shard_model,
    transformer_blocks,
)

IDS = torch.tensor([[2, 10, 11, 12, 13, 14], [2, 20, 21, 22, 23, 24]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


@pytest.fixture()
def world_of_one(tmp_path):
    """A gloo process group of one rank and its (data_parallel, tensor_parallel) = (1, 1) device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def tiny_lm(tokenizer, tiny_config, **overrides):
    torch.manual_seed(0)
    return load_causal_lm({**tiny_config, **overrides}, tokenizer=tokenizer)


# ---- structure ----------------------------------------------------------------------------------


def test_blocks_are_the_hf_decoder_layers(tokenizer, tiny_config):
    lm = tiny_lm(tokenizer, tiny_config)
    assert [type(b).__name__ for b in transformer_blocks(lm)] == ["LlamaDecoderLayer"] * 2
    wrapper = CausalLMWithValueHead(lm)
    assert transformer_blocks(wrapper) == list(lm.model.layers)
    torch.manual_seed(0)
    rm = load_reward_model(dict(tiny_config), tokenizer=tokenizer)
    assert [type(b).__name__ for b in transformer_blocks(rm)] == ["LlamaDecoderLayer"] * 2


def test_blocks_fall_back_to_the_longest_module_list():
    model = nn.Sequential(nn.Embedding(5, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]), nn.ModuleList([nn.ReLU()]))
    assert transformer_blocks(model) == list(model[1])


def test_leaf_units_group_tied_weights(tokenizer, tiny_config):
    untied = tiny_lm(tokenizer, tiny_config)
    groups = _leaf_units(untied, transformer_blocks(untied))
    assert sorted(len(g) for g in groups) == [1, 1, 1]  # embedding, final norm, LM head
    tied = tiny_lm(tokenizer, tiny_config, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    groups = _leaf_units(tied, transformer_blocks(tied))
    grouped = [g for g in groups if len(g) == 2]
    assert len(grouped) == 1 and {id(m) for m in grouped[0]} == {id(tied.lm_head), id(tied.model.embed_tokens)}


def test_qualified_name_spells_state_dict_keys_without_wrapper_segments():
    """FSDP1 wraps blocks in place (``..._fsdp_wrapped_module...``) but its full state dict keys do not
    carry those segments: the export keeps the keys under the export model's clean prefix."""
    inner = nn.Linear(2, 2)
    root = nn.Module()
    root.model = nn.Module()
    root.model._fsdp_wrapped_module = nn.Module()
    root.model._fsdp_wrapped_module.policy = inner
    assert _qualified_name(root, inner) == "model.policy"
    assert _qualified_name(root, root) == ""
    with pytest.raises(ValueError, match="not a submodule"):
        _qualified_name(root, nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs,message", [({"frozen_models": "copy"}, "frozen_models"), ({"param_dtype": "bf17"}, "dtype")])
def test_plan_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FSDP2Plan(**kwargs)


def test_configure_model_is_a_noop_without_model_parallel_strategy(tokenizer_dir, tiny_config):
    from lightning.pytorch.strategies import DDPStrategy

    from rlhf_lightning.modules import DPOModule

    module = DPOModule(model=dict(tiny_config), tokenizer=tokenizer_dir)
    module.configure_model()  # no trainer
    module._trainer = SimpleNamespace(strategy=DDPStrategy())
    module.configure_model()
    assert not is_fsdp2_sharded(module) and module.export_state_dict() is None


# ---- numerics on every call path, against the unsharded model ----------------------------------


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True])
def test_sharded_lm_matches_unsharded(world_of_one, tokenizer, tiny_config, tie):
    reference = tiny_lm(tokenizer, tiny_config, tie_word_embeddings=tie)
    sharded = shard_model(copy.deepcopy(reference), world_of_one["data_parallel"], FSDP2Plan(), trainable=True)
    for model in (reference, sharded):
        model.train()
        model(input_ids=IDS, attention_mask=MASK).logits.float().pow(2).mean().backward()
    torch.testing.assert_close(_grads(sharded), _grads(reference))
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=IDS, attention_mask=MASK).logits, reference(input_ids=IDS, attention_mask=MASK).logits)
    prompts, prompt_mask = IDS[:, :4], torch.ones(2, 4, dtype=torch.long)
    outs = [generate(m, tokenizer, prompts, prompt_mask, max_new_tokens=5, do_sample=False).input_ids for m in (reference, sharded)]
    assert torch.equal(outs[0], outs[1])
    state = full_state_dict(sharded)
    assert state.keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(state[name], tensor)


def test_sharded_value_head_wrapper_paths(world_of_one, tokenizer, tiny_config):
    """Forward of the wrapper, ``values`` (a method, not ``forward``), and ``generate`` on the inner LM,
    which enters neither the wrapper's nor the LM's own forward first."""
    reference = CausalLMWithValueHead(tiny_lm(tokenizer, tiny_config), value_head_init_std=0.1)
    sharded = shard_model(copy.deepcopy(reference), world_of_one["data_parallel"], FSDP2Plan(), trainable=True)
    prompts, prompt_mask = IDS[:, :4], torch.ones(2, 4, dtype=torch.long)
    outs = [generate(m, tokenizer, prompts, prompt_mask, max_new_tokens=4, do_sample=False).input_ids for m in (reference, sharded)]
    assert torch.equal(outs[0], outs[1])
    for model in (reference, sharded):
        model.values(IDS, MASK).pow(2).sum().backward()
    torch.testing.assert_close(_grads(sharded), _grads(reference))
    with torch.no_grad():
        logits, values = sharded(IDS, MASK)
        expected_logits, expected_values = reference(IDS, MASK)
    torch.testing.assert_close(logits, expected_logits)
    torch.testing.assert_close(values, expected_values)


def test_sharded_reward_model_backbone_and_head(world_of_one, tokenizer, tiny_config):
    torch.manual_seed(0)
    reference = load_reward_model(dict(tiny_config), tokenizer=tokenizer)
    sharded = shard_model(copy.deepcopy(reference), world_of_one["data_parallel"], FSDP2Plan(), trainable=True)
    for model in (reference, sharded):
        reward_model_scores(model, IDS, MASK).sum().backward()
    torch.testing.assert_close(_grads(sharded), _grads(reference))


# ---- apply_fsdp2: what gets sharded ------------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, policy: nn.Module, frozen: nn.Module):
        super().__init__()
        self.policy = policy
        self.frozen = frozen


def _fake_fsdp2_module(mesh, holder: nn.Module, plan: FSDP2Plan | None = None):
    """``holder`` dressed as a LightningModule under a ModelParallelStrategy (what apply_fsdp2 reads)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    if plan is not None:
        strategy.plan = plan
    strategy.parallel_devices = [torch.device("cpu")]
    holder._trainer = SimpleNamespace(strategy=strategy)
    holder.device_mesh = mesh
    return holder


@pytest.mark.parametrize("frozen_models", ["shard", "replicate"])
def test_apply_fsdp2_shards_trainable_and_places_frozen_per_plan(world_of_one, tokenizer, tiny_config, frozen_models):
    from rlhf_lightning.models import freeze

    holder = _Holder(tiny_lm(tokenizer, tiny_config), freeze(tiny_lm(tokenizer, tiny_config)))
    module = _fake_fsdp2_module(world_of_one, holder, FSDP2Plan(frozen_models=frozen_models))
    targets = {"policy": holder.policy, "frozen": holder.frozen}
    assert apply_fsdp2(module, targets) is True
    assert is_fsdp2_sharded(holder.policy)
    assert is_fsdp2_sharded(holder.frozen) == (frozen_models == "shard")
    assert apply_fsdp2(module, targets) is True  # idempotent: Lightning calls configure_model per stage


def test_apply_fsdp2_refuses_trainable_parameters_it_cannot_shard(world_of_one, tokenizer, tiny_config):
    holder = _Holder(tiny_lm(tokenizer, tiny_config), nn.Linear(2, 2))
    holder.stray = nn.Parameter(torch.zeros(2))
    module = _fake_fsdp2_module(world_of_one, holder)
    with pytest.raises(ValueError, match="owned by the LightningModule itself"):
        apply_fsdp2(module, {"policy": holder.policy})
    del holder.stray
    # A trainable child left out of the targets would train unsynchronised on each rank: refused.
    with pytest.raises(RuntimeError, match="outside any FSDP2 unit"):
        apply_fsdp2(module, {"policy": holder.policy})
