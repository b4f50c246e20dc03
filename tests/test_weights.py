"""Weight arithmetic: EMA by hand, interpolation endpoints on a tiny Llama, per-layer alpha specs, SLERP
endpoints and colinear fallback, soups."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.models import load_causal_lm
from rlhf_lightning.weights import (
    average_state_dicts,
    ema_update_,
    interpolate_state_dicts,
    layer_index,
    load_soup,
    resolve_alpha,
    slerp_task_vectors,
)

IDS = torch.tensor([[2, 10, 11, 12, 13, 3]])


def test_ema_after_three_updates_by_hand():
    """decay 0.5, ema0 = 0, online 1, 2, 3: e1 = 0.5, e2 = 0.25 + 1 = 1.25, e3 = 0.625 + 1.5 = 2.125."""
    ema = [torch.zeros(2)]
    for value in (1.0, 2.0, 3.0):
        ema_update_(ema, [torch.full((2,), value)], 0.5)
    assert_close(ema[0], torch.full((2,), 2.125))
    named = {"w": torch.zeros(1)}
    ema_update_(named, {"w": torch.ones(1, dtype=torch.bfloat16)}, 0.9)  # by name, dtype cast
    assert_close(named["w"], torch.tensor([0.1]))
    with pytest.raises(ValueError, match="decay"):
        ema_update_(ema, ema, 1.5)


@pytest.fixture()
def init_and_trained(tokenizer, tiny_config):
    torch.manual_seed(0)
    init = load_causal_lm(tiny_config, tokenizer=tokenizer)
    torch.manual_seed(1)
    trained = load_causal_lm(tiny_config, tokenizer=tokenizer)
    return init, trained


@torch.no_grad()
def test_interpolation_endpoints_reproduce_logits(init_and_trained, tokenizer, tiny_config):
    init, trained = init_and_trained
    merged = load_causal_lm(tiny_config, tokenizer=tokenizer)
    for alpha, source in ((0.0, init), (1.0, trained)):
        merged.load_state_dict(interpolate_state_dicts(init.state_dict(), trained.state_dict(), alpha))
        assert torch.equal(merged(IDS).logits, source(IDS).logits)
    half = interpolate_state_dicts(init.state_dict(), trained.state_dict(), 0.5)
    name = "model.layers.0.mlp.up_proj.weight"
    assert_close(half[name], (init.state_dict()[name] + trained.state_dict()[name]) / 2)


def test_layer_index_parsing():
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("transformer.h.11.attn.c_attn.weight") == 11
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None


def _expected_alpha(init, trained, merged):
    """The alpha a merged tensor realises, least squares over the tensor: <m - i, t - i> / |t - i|^2."""
    delta = trained - init
    return ((merged - init) * delta).sum().item() / (delta * delta).sum().item()


@pytest.mark.parametrize(
    "spec, layer_alphas, outside",
    [
        ([0.2, 0.9], [0.2, 0.9], 0.55),  # list: non-layer params get the mean
        ({"0": 0.1, "1-1": 0.7, "default": 0.3}, [0.1, 0.7], 0.3),
        ({"0-1": 0.25, "default": 1.0}, [0.25, 0.25], 1.0),
    ],
)
def test_per_layer_alphas_hit_the_right_parameters(init_and_trained, spec, layer_alphas, outside):
    init, trained = (m.state_dict() for m in init_and_trained)
    merged = interpolate_state_dicts(init, trained, spec)
    for name in init:
        idx = layer_index(name)
        want = layer_alphas[idx] if idx is not None else outside
        if torch.equal(init[name], trained[name]):  # e.g. norms initialised to ones: nothing to interpolate
            assert torch.equal(merged[name], init[name])
            continue
        assert _expected_alpha(init[name], trained[name], merged[name]) == pytest.approx(want, abs=1e-4), name


@pytest.mark.parametrize(
    "spec, message",
    [
        ([0.5], "2 decoder layers"),
        ({"0": 0.5}, "default"),
        ({"0-3": 0.5, "2-5": 0.1, "default": 0.0}, "overlaps"),
        ({"first": 0.5}, "Bad layer range"),
        ({"3-1": 0.5}, "Bad layer range"),
        ("0.5", "alpha"),
        (float("inf"), "finite"),
    ],
)
def test_bad_alpha_specs(spec, message):
    names = ["model.layers.0.w", "model.layers.1.w", "lm_head.weight"]
    with pytest.raises(ValueError, match=message):
        resolve_alpha(spec, names)


def test_slerp_endpoints_and_known_angle():
    base = {"w": torch.zeros(2), "b": torch.ones(3)}
    a = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0, 1.0, 1.0])}
    b = {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 2.0, 1.0])}
    assert_close(slerp_task_vectors(base, a, b, 0.0), a)
    assert_close(slerp_task_vectors(base, a, b, 1.0), b)
    # orthogonal unit task vectors, t = 1/2: the arc midpoint (1, 1) / sqrt(2), norm kept at 1
    mid = slerp_task_vectors(base, a, b, 0.5)
    assert_close(mid["w"], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert_close(mid["b"], torch.ones(3) + torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))


def test_slerp_colinear_and_zero_vectors_fall_back_to_lerp():
    base = {"w": torch.tensor([1.0, 1.0])}
    a = {"w": torch.tensor([2.0, 3.0])}  # u = (1, 2)
    b = {"w": torch.tensor([4.0, 7.0])}  # v = (3, 6) = 3u: colinear, slerp's sin(omega) = 0
    out = slerp_task_vectors(base, a, b, 0.25)
    assert_close(out["w"], torch.tensor([1.0, 1.0]) + 0.75 * torch.tensor([1.0, 2.0]) + 0.25 * torch.tensor([3.0, 6.0]))
    assert torch.isfinite(slerp_task_vectors(base, base, b, 0.5)["w"]).all()  # zero task vector
    antiparallel = slerp_task_vectors(base, a, {"w": torch.tensor([0.0, -1.0])}, 0.5)
    assert_close(antiparallel["w"], torch.tensor([1.0, 1.0]))


def test_soup_of_two_is_the_average():
    sd1 = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(3)}
    sd2 = {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(5)}
    soup = average_state_dicts([sd1, sd2])
    assert_close(soup["w"], torch.tensor([2.0, 4.0]))
    assert soup["steps"].item() == 3  # integer buffers are copied from the first, not averaged
    assert_close(average_state_dicts([sd1, sd2], weights=[3, 1])["w"], torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match="weights"):
        average_state_dicts([sd1, sd2], weights=[1.0])
    with pytest.raises(ValueError, match="Shape mismatch"):
        average_state_dicts([sd1, {"w": torch.zeros(3), "steps": torch.tensor(1)}])
    with pytest.raises(ValueError, match="do not match"):
        average_state_dicts([sd1, {"w": torch.zeros(2)}])


def test_load_soup_from_checkpoints(tmp_path, init_and_trained, tokenizer, tiny_config):
    init, trained = init_and_trained
    init.save_pretrained(tmp_path / "a")
    trained.save_pretrained(tmp_path / "b")
    soup = load_soup([str(tmp_path / "a"), str(tmp_path / "b")], tokenizer=tokenizer)
    want = average_state_dicts([init.state_dict(), trained.state_dict()])
    for name, tensor in soup.state_dict().items():
        assert_close(tensor, want[name])
    wider = load_causal_lm({**tiny_config, "intermediate_size": 96}, tokenizer=tokenizer)
    wider.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="Shape mismatch"):
        load_soup([str(tmp_path / "a"), str(tmp_path / "c")])
    other = load_causal_lm(
        {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}, tokenizer=tokenizer
    )
    with pytest.raises(ValueError, match="architectures differ"):
        load_soup([str(tmp_path / "a"), other])


@torch.no_grad()
def test_load_soup_of_built_modules_leaves_them_alone(init_and_trained):
    init, trained = init_and_trained
    before = {k: v.clone() for k, v in init.state_dict().items()}
    soup = load_soup([init, trained], weights=[1, 3])
    assert soup is not init
    for name, tensor in init.state_dict().items():  # the first member is read, not overwritten by the average
        assert torch.equal(tensor, before[name]), name
    for name, tensor in soup.state_dict().items():
        assert_close(tensor, 0.25 * before[name] + 0.75 * trained.state_dict()[name], rtol=0, atol=1e-6)


def test_load_soup_uses_the_given_loader():
    calls = []

    def loader(spec, *, tokenizer=None, dtype=None):
        calls.append((spec, tokenizer, dtype))
        layer = torch.nn.Linear(2, 1, bias=False)
        layer.weight.data.fill_(float(spec))
        return layer

    soup = load_soup([1.0, 4.0], weights=[2, 1], loader=loader, tokenizer="tok", dtype="float32")
    assert_close(soup.weight, torch.full((1, 2), 2.0))  # (2 * 1 + 1 * 4) / 3
    assert calls == [(1.0, "tok", "float32"), (4.0, "tok", "float32")]
