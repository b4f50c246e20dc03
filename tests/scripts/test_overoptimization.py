"""scripts/overoptimization.py: Gao et al.'s fits recover known curves exactly, bad arguments are refused, and the
``--quick`` study on the session's world shows best-of-n gold and proxy diverge for a weak proxy, with a two-rollout
PPO run against an ensemble objective (slow)."""

from __future__ import annotations

import csv
import math
import os

import pytest


def load_script():
    from tests.conftest import load_script as load

    return load("overoptimization")


def test_gao_fits_recover_known_curves():
    """gain = d (0.5 - 0.1 d) (best-of-n) peaks at d = 0.5 / 0.2 = 2.5; gain = d (0.3 - 0.1 log d) (RL) peaks at
    d = exp(0.3 / 0.1 - 1) = e^2. Exact data: the least-squares fit returns alpha, beta and R^2 = 1."""
    script = load_script()
    d = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    bon = script.fit_gao(d, [x * (0.5 - 0.1 * x) for x in d], "bon")
    assert bon["alpha"] == pytest.approx(0.5) and bon["beta"] == pytest.approx(0.1)
    assert bon["r2"] == pytest.approx(1.0) and bon["peak_d"] == pytest.approx(2.5) and bon["points"] == 6
    rl = script.fit_gao(d, [x * (0.3 - 0.1 * math.log(x)) if x > 0 else 0.0 for x in d], "rl")
    assert rl["alpha"] == pytest.approx(0.3) and rl["beta"] == pytest.approx(0.1)
    assert rl["r2"] == pytest.approx(1.0) and rl["peak_d"] == pytest.approx(math.exp(2.0))
    rising = script.fit_gao(d, [x * (0.5 + 0.1 * x) for x in d], "bon")  # beta < 0: the curve never turns
    assert rising["beta"] == pytest.approx(-0.1) and rising["peak_d"] == math.inf
    # Noisy data: R^2 below 1 but the fit still close.
    noisy = script.fit_gao(d, [x * (0.5 - 0.1 * x) + e for x, e in zip(d, [0, 0.02, -0.02, 0.01, -0.01, 0.0])], "bon")
    assert 0.9 < noisy["r2"] < 1.0 and abs(noisy["alpha"] - 0.5) < 0.05
    with pytest.raises(ValueError, match="form must be"):
        script.fit_gao(d, d, "ppo")
    with pytest.raises(ValueError, match="at least 3 points"):
        script.fit_gao([0.0, 1.0], [0.0, 1.0], "bon")


def test_bad_arguments_are_refused(capsys):
    script = load_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--ppo-objectives", "nonexistent"])
    assert "name no proxy or ensemble" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--ensemble", "100:s:0"])
    assert "at least 2 members" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pairs:size:seed"):
        script.parse_args(["--proxies", "100-s-0"])
    with pytest.raises(ValueError, match="choose from"):
        script.parse_args(["--proxies", "100:xxl:0"])


def _number(value):
    try:
        return float(value)
    except ValueError:
        return value


def _read(path):
    with open(path) as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_quick_study_best_of_n_gold_and_proxy_diverge_for_a_weak_proxy(world_dir, sft_policy_dir, tmp_path):
    """A proxy trained on 150 noisy pairs: best-of-n raises its own score (in gold SDs) far more than gold, and buys
    less than half of the gold that best-of-n by the gold scorer itself buys from the same draws."""
    script = load_script()
    out = tmp_path / "oo"
    assert script.main(["--quick", "--run-dir", str(out), "--world-dir", world_dir, "--sft-dir", sft_policy_dir,
                        "--ppo-objectives", "ens_uwo", "--ppo-steps", "2", "--eval-every", "1", "--eval-prompts", "4"]) == 0
    for name in ("bon.csv", "bon_peaks.csv", "fits.csv", "proxies.csv", "overoptimization.png", "summary.md",
                 "ppo.csv", "ppo_vs_rollouts.png"):
        assert os.path.getsize(out / name) > 0, name
    bon = _read(out / "bon.csv")
    selectors = {r["selector"] for r in bon}
    assert selectors == {"n150_xs_seed0", "n150_xs_seed1", "ens_mean", "ens_wco", "ens_uwo", "gold"}
    for name in selectors:  # best-of-n never lowers the score it ranks by (exact expectation over subsets)
        proxy = [r["proxy"] for r in sorted((r for r in bon if r["selector"] == name), key=lambda r: r["n"])]
        assert all(b >= a - 1e-9 for a, b in zip(proxy, proxy[1:])), (name, proxy)
    (proxy_row,) = [r for r in _read(out / "proxies.csv") if r["proxy"] == "n150_xs_seed0"]
    assert proxy_row["val_accuracy"] < 0.8  # weak, as intended

    def gain(selector, key):
        rows = {r["n"]: r for r in bon if r["selector"] == selector}
        return rows[64.0][key] - rows[1.0][key]

    weak_gold, oracle_gold = gain("n150_xs_seed0", "gold"), gain("gold", "gold")
    weak_proxy_in_gold_sd = gain("n150_xs_seed0", "proxy_in_gold_sd")
    assert oracle_gold > 0.3
    assert weak_gold < 0.5 * oracle_gold, (weak_gold, oracle_gold)
    assert weak_proxy_in_gold_sd > weak_gold + 0.2, (weak_proxy_in_gold_sd, weak_gold)
    fits = _read(out / "fits.csv")
    assert {f["objective"] for f in fits if f["method"] == "best-of-n"} == selectors
    assert all(math.isfinite(f["alpha"]) and f["r2"] <= 1.0 for f in fits)
    # PPO against the UWO ensemble of the standardised members: evaluated at rollouts 0, 1, 2 (gold, proxy, KL), fitted.
    ppo = _read(out / "ppo.csv")
    assert [(r["objective"], r["step"]) for r in ppo] == [("ens_uwo", 0.0), ("ens_uwo", 1.0), ("ens_uwo", 2.0)]
    assert ppo[0]["kl_to_reference"] == pytest.approx(0.0, abs=1e-4) and all(math.isfinite(r["proxy"]) for r in ppo)
    assert [f["objective"] for f in fits if f["method"] == "ppo"] == ["ens_uwo"]
