"""The embedded world's files: schema, determinism, label noise, tokenizer round trip, CLI."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest

from rlhf_lightning.synthetic import (
    GOLD_OBJECTIVES,
    generate_demonstration,
    parse_prompt,
    sample_facts,
    make_prompt,
    score_all,
    unigram_perplexity,
    write_world,
)
from rlhf_lightning.synthetic.__main__ import main

SMALL = dict(n_demonstrations=200, n_val_demonstrations=50, n_pairs=150, n_val_pairs=50, n_prompts=60, n_eval_prompts=30)
NOISY = dict(SMALL, n_pairs=2000, label_noise=0.1)


def _read(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    return write_world(tmp_path_factory.mktemp("world"), seed=3, **NOISY)


def test_files_and_schema(world):
    expected = {"sft_train", "sft_val", "prompts_train", "prompts_eval", "tokenizer", "manifest"}
    expected |= {f"pairs_{o}_{s}" for o in GOLD_OBJECTIVES for s in ("train", "val")}
    assert set(world) == expected
    assert Path(world["tokenizer"], "tokenizer.json").is_file()
    manifest = json.loads(Path(world["manifest"]).read_text())
    assert manifest["settings"]["seed"] == 3 and manifest["vocab_size"] > 200
    assert manifest["sizes"]["pairs_fluency_train"] == 2000

    sft = _read(world["sft_train"])
    assert len(sft) == 200 and all(set(r) == {"prompt", "completion"} for r in sft)
    assert all(2 <= len(score_all(r["prompt"], r["completion"])["fluency"].spans) <= 5 for r in sft)
    prompts = _read(world["prompts_eval"])
    assert len(prompts) == 30
    for r in prompts:
        assert parse_prompt(r["prompt"]) == (r["genre"], r["actor"], r["rating"])
    for objective in GOLD_OBJECTIVES:
        for r in _read(world[f"pairs_{objective}_val"]):
            assert set(r) == {"prompt", "chosen", "rejected", "chosen_scores", "rejected_scores"}
            assert set(r["chosen_scores"]) == set(GOLD_OBJECTIVES) == set(r["rejected_scores"])
            assert r["chosen"] != r["rejected"]
            # stored scores are the gold totals (rounded to 1e-6)
            assert r["chosen_scores"][objective] == pytest.approx(score_all(r["prompt"], r["chosen"])[objective].total, abs=1e-6)


@pytest.mark.parametrize("objective", GOLD_OBJECTIVES)
def test_label_noise_rate(world, objective):
    # 2000 pairs, noise 0.1: the correct fraction has std 0.0067; [0.87, 0.93] is +-4.5 std.
    train = _read(world[f"pairs_{objective}_train"])
    correct = [r["chosen_scores"][objective] > r["rejected_scores"][objective] for r in train]
    assert all(r["chosen_scores"][objective] != r["rejected_scores"][objective] for r in train)  # no ties
    assert 0.87 <= sum(correct) / len(correct) <= 0.93
    val = _read(world[f"pairs_{objective}_val"])
    assert all(r["chosen_scores"][objective] > r["rejected_scores"][objective] for r in val)


def test_noise_free_pairs_are_all_correct(tmp_path):
    paths = write_world(tmp_path, seed=1, **dict(SMALL, n_pairs=400, label_noise=0.0))
    for objective in GOLD_OBJECTIVES:
        train = _read(paths[f"pairs_{objective}_train"])
        assert all(r["chosen_scores"][objective] > r["rejected_scores"][objective] for r in train)


def test_pairs_are_not_trivially_separable(world):
    # Pairs of one objective must not be ordered by another objective or by length.
    train = _read(world["pairs_sentiment_train"])
    for other in ("consistency", "fluency"):
        agree = sum(r["chosen_scores"][other] > r["rejected_scores"][other] for r in train) / len(train)
        assert 0.2 < agree < 0.8, other
    longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in train) / len(train)
    assert 0.35 < longer < 0.65


def test_same_seed_same_files_other_seed_differs(tmp_path):
    a = write_world(tmp_path / "a", seed=7, **SMALL)
    b = write_world(tmp_path / "b", seed=7, **SMALL)
    c = write_world(tmp_path / "c", seed=8, **SMALL)
    for name in a:
        if name in ("tokenizer", "manifest"):
            continue
        assert Path(a[name]).read_bytes() == Path(b[name]).read_bytes(), name
        assert Path(a[name]).read_bytes() != Path(c[name]).read_bytes(), name
    assert Path(a["tokenizer"], "tokenizer.json").read_bytes() == Path(c["tokenizer"], "tokenizer.json").read_bytes()


def test_existing_world_is_reused_unless_settings_change(tmp_path):
    paths = write_world(tmp_path, seed=0, **SMALL)
    sft = Path(paths["sft_train"])
    sft.write_text("sentinel\n")
    write_world(tmp_path, seed=0, **SMALL)
    assert sft.read_text() == "sentinel\n"
    write_world(tmp_path, seed=0, **dict(SMALL, n_demonstrations=201))
    assert len(_read(sft)) == 201


def test_demonstrations_follow_the_rating():
    rng = random.Random(0)
    means = {}
    for rating in (1, 3, 5):
        facts = sample_facts(rng)._replace(rating=rating)
        prompt = make_prompt(facts)
        totals = [score_all(prompt, generate_demonstration(rng, facts)) for _ in range(150)]
        means[rating] = sum(t["sentiment"].total for t in totals) / len(totals)
        assert min(t["fluency"].total for t in totals) == 1.0  # demonstrations are fluent
        assert sum(t["consistency"].total for t in totals) / len(totals) > 0.5
    assert means[1] < -0.4 and abs(means[3]) < 0.15 and means[5] > 0.4


def test_tokenizer_round_trip_has_no_unk(world):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world["tokenizer"])
    texts = [r["prompt"] for r in _read(world["prompts_train"])]
    for r in _read(world["sft_train"]):
        texts += [r["prompt"], r["completion"]]
    for r in _read(world["pairs_fluency_train"])[:500]:  # perturbed candidates too
        texts += [r["chosen"], r["rejected"]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unigram_perplexity_matches_hand_computation():
    # train counts over V=3: {0: 2, 1: 1, 2: 0}; N=3; p = (3/6, 2/6, 1/6); val = [0, 2]
    # ppl = exp(-(log(1/2) + log(1/6)) / 2) = sqrt(12)
    assert unigram_perplexity([[0, 0, 1]], [[0], [2]], vocab_size=3) == pytest.approx(math.sqrt(12))
    with pytest.raises(ValueError):
        unigram_perplexity([[0]], [[5]], vocab_size=3)


def test_cli_writes_world(tmp_path, capsys):
    code = main(["--out", str(tmp_path), "--seed", "2", "--n-demonstrations", "20", "--n-val-demonstrations", "5",
                 "--n-pairs", "10", "--n-val-pairs", "5", "--n-prompts", "5", "--n-eval-prompts", "5",
                 "--label-noise", "0.2", "--objectives", "sentiment", "fluency"])
    assert code == 0
    paths = json.loads(capsys.readouterr().out)
    assert "pairs_consistency_train" not in paths
    assert len(_read(paths["pairs_fluency_train"])) == 10
    assert json.loads(Path(paths["manifest"]).read_text())["settings"]["label_noise"] == 0.2
    assert main(["--out", str(tmp_path), "--label-noise", "0.9"]) == 2
