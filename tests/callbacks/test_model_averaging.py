"""ModelAveraging on a tiny HF Llama: the exported directory holds (1 - alpha) init + alpha trained and
reloads with from_pretrained; alpha = 0 applied in place gives back the initial logits; a resumed run
averages with the checkpointed initial weights."""

import pytest
import torch
from tests.callbacks.callback_testkit import HFPolicyModule, assert_same_tensors, crash_then_resume, make_trainer, dataloader, uninterrupted
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_lightning.callbacks import ModelAveraging
from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.weights import interpolate_state_dicts

IDS = torch.tensor([[2, 10, 11, 12, 13, 3]])


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_export_is_the_interpolation_and_reloads(tmp_path, tiny_model, tokenizer):
    init = clone_state(tiny_model)
    callback = ModelAveraging(alpha={"0": 0.2, "1": 0.8, "default": 0.5}, dirpath=str(tmp_path / "avg"))
    module = HFPolicyModule(tiny_model, tokenizer)
    make_trainer(tmp_path, 3, [callback]).fit(module, dataloader())
    trained = clone_state(tiny_model)
    assert not torch.equal(trained["lm_head.weight"], init["lm_head.weight"])
    want = interpolate_state_dicts(init, trained, {"0": 0.2, "1": 0.8, "default": 0.5})
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "avg"))
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "avg")).pad_token_id == tokenizer.pad_token_id
    assert_same_tensors(clone_state(tiny_model), trained)  # apply_to_model=False leaves the policy alone
    # on demand, with the endpoints
    assert_same_tensors(callback.interpolate(module, alpha=1.0), trained)
    assert_same_tensors(callback.interpolate(tiny_model, alpha=0.0), init)


@torch.no_grad()
def test_alpha_zero_applied_in_place_restores_initial_logits(tmp_path, tiny_model, tokenizer):
    initial_logits = tiny_model(IDS).logits.clone()
    module = HFPolicyModule(tiny_model, tokenizer)
    with torch.enable_grad():
        make_trainer(tmp_path, 2, [ModelAveraging(alpha=0.0, dirpath=str(tmp_path / "a"), apply_to_model=True)]).fit(
            module, dataloader()
        )
    assert torch.equal(tiny_model(IDS).logits, initial_logits)


def test_model_averaging_crash_and_resume_equals_uninterrupted(tmp_path, tokenizer, tiny_config):
    def make_module(seed):
        torch.manual_seed(seed)
        return HFPolicyModule(load_causal_lm(tiny_config, tokenizer=tokenizer), tokenizer)

    def run(root, crash):
        make_callbacks = lambda: [ModelAveraging(alpha=0.5, dirpath=str(root / "avg"))]  # noqa: E731
        if crash:
            return crash_then_resume(root, make_module, make_callbacks, total_steps=4, crash_step=2)
        return uninterrupted(root, make_module, make_callbacks, total_steps=4)

    module_a, (avg_a,) = run(tmp_path / "full", crash=False)
    module_b, (avg_b,) = run(tmp_path / "crash", crash=True)
    assert_same_tensors(avg_b.init_state_dict(), avg_a.init_state_dict())
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "avg"))
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "crash" / "avg"))
    assert_same_tensors(b.state_dict(), a.state_dict())


@pytest.mark.parametrize("alpha", [[], {"x": 0.5}, "half", True, {"default": float("nan")}])
def test_bad_alpha_rejected_at_construction(alpha):
    with pytest.raises(ValueError):
        ModelAveraging(alpha=alpha)
