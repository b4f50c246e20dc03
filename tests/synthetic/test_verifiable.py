"""Verifiable tasks: the rules on hand-written reviews, and the share of the world's demonstrations that pass."""

import pytest

from rlhf_lightning.synthetic import make_prompt
from rlhf_lightning.synthetic.scorers import Facts
from rlhf_lightning.synthetic.verifiable import VERIFIABLE_TASKS, states_facts, states_rating, verify

PROMPT = make_prompt(Facts("horror", "nina", 4))  # "review of a horror film starring nina. rating 4 out of 5."


@pytest.mark.parametrize("completion,expected", [
    ("a scary film. i give it 4 out of 5.", 1.0),
    ("nina was great. 4 stars from me.", 1.0),
    ("a scary film. i give it 2 out of 5.", 0.0),             # wrong rating
    ("4 out of 5. no, 3 out of 5.", 0.0),                     # the right rating and a wrong one
    ("a scary film with nina.", 0.0),                         # no rating stated
    ("i saw it 4 times.", 0.0),                               # a number is not a rating claim
])
def test_states_rating(completion, expected):
    assert states_rating(PROMPT, completion) == expected
    assert verify("states_rating", PROMPT, completion) == expected


@pytest.mark.parametrize("completion,expected", [
    ("a horror film with nina. 4 out of 5.", 1.0),
    ("a horror film with nina and marco. 4 out of 5.", 0.0),  # a wrong actor named too
    ("a comedy film with nina. 4 out of 5.", 0.0),            # wrong genre
    ("a horror film. 4 out of 5.", 0.0),                      # actor missing
])
def test_states_facts(completion, expected):
    assert states_facts(PROMPT, completion) == expected


def test_prompt_without_rating_and_unknown_task():
    assert states_rating("a film.", "4 out of 5.") == 0.0
    with pytest.raises(ValueError, match="Unknown verifiable task"):
        verify("solves_sudoku", PROMPT, "")
    assert set(VERIFIABLE_TASKS) == {"states_rating", "states_facts"}


def test_demonstrations_pass_sometimes_not_always(tmp_path):
    """The task must be learnable from the SFT data but not already solved by it."""
    import json

    from rlhf_lightning.synthetic import write_world

    write_world(tmp_path, seed=0, n_demonstrations=300, n_val_demonstrations=10, n_pairs=10, n_val_pairs=10,
                n_prompts=10, n_eval_prompts=10)
    rows = [json.loads(line) for line in open(tmp_path / "sft_train.jsonl")]
    share = sum(states_rating(r["prompt"], r["completion"]) for r in rows) / len(rows)
    assert 0.05 < share < 0.5, share
