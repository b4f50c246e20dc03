"""The embedded world: seeded movie-review prompts, demonstrations, preference pairs and prompt sets.

A prompt states three facts (genre, lead actor, star rating), e.g.
``"review of a horror film starring nina. rating 2 out of 5."``; a completion is a review of 2-5
sentences drawn from the templates of ``lexicon.py``. All randomness comes from ``random.Random``
instances seeded from ``(seed, stream name)``, so each file depends only on the seed and its own size.

Demonstrations follow the prompt: sentence polarities are drawn around the rating (1 star: mostly
strongly negative, 3: mixed, 5: mostly strongly positive), facts are always right, no sentence or polar
word repeats. Preference candidates come from a much broader generator (a random "persona" rating,
wrong facts, shuffled or truncated sentences, repeated sentences, 1-6 sentences), and half of the pairs
are a candidate against a one-sentence edit of itself, so a reward model has to learn the scorer rather
than a length or style shortcut. The pair for objective X is ordered by gold X, then flipped with
probability ``label_noise`` (validation pairs are never flipped); ties on X are never emitted.

Files written by :func:`write_world` (JSONL, the user-facing schema of docs/CONTRACTS_INTERNAL.md):
``sft_train.jsonl``/``sft_val.jsonl`` (``prompt``, ``completion``), ``pairs_<objective>_train.jsonl``/
``pairs_<objective>_val.jsonl`` (``prompt``, ``chosen``, ``rejected``, ``chosen_scores``,
``rejected_scores``: every objective's gold total), ``prompts_train.jsonl``/``prompts_eval.jsonl``
(``prompt`` plus the facts ``genre``, ``actor``, ``rating``), the tokenizer in ``tokenizer/`` and a
``world.json`` manifest.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from rlhf_lightning.synthetic.lexicon import (
    ACTORS,
    CLASSES,
    GENERIC_ASPECTS_PL,
    GENERIC_ASPECTS_SG,
    GENRE_ASPECTS,
    GENRES,
    LEXICON,
    PROMPT_TEMPLATES,
    RATINGS,
    SLOT_ALIASES,
    TEMPLATES,
    content_words,
    tokenize_words,
    world_words,
)
from rlhf_lightning.synthetic.scorers import GOLD_OBJECTIVES, Facts, score_all
from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer

__all__ = [
    "WORLD_VERSION",
    "WorldConfig",
    "build_world_tokenizer",
    "sample_facts",
    "make_prompt",
    "generate_demonstration",
    "generate_candidate",
    "generate_pair",
    "write_world",
]

# Bump when generators or scorers change, so cached worlds on disk are rebuilt.
WORLD_VERSION = 1

# Sentence polarity targets given the rating: (targets, weights). 0 means a neutral or mixed sentence.
_TARGETS: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    1: ((-1.0, -0.5, 0.0), (0.65, 0.25, 0.10)),
    2: ((-1.0, -0.5, 0.0, 0.5), (0.20, 0.50, 0.20, 0.10)),
    3: ((-0.5, 0.0, 0.5), (0.30, 0.40, 0.30)),
    4: ((-0.5, 0.0, 0.5, 1.0), (0.10, 0.20, 0.50, 0.20)),
    5: ((0.0, 0.5, 1.0), (0.10, 0.25, 0.65)),
}

# Polar slot -> polarity -> fillers; built once from the lexicon.
_POLAR_SLOTS = ("ADJ", "VPAST", "VBASE", "FANVERB", "GVERB", "NOUN")


def _by_polarity() -> dict[str, dict[float, tuple[str, ...]]]:
    table: dict[str, dict[float, list[str]]] = {}
    for slot in _POLAR_SLOTS:
        for filler in CLASSES[slot]:
            value = next(LEXICON[w] for w in filler.split() if w in LEXICON)
            table.setdefault(slot, {}).setdefault(value, []).append(filler)
    return {slot: {v: tuple(f) for v, f in d.items()} for slot, d in table.items()}


_POLAR = _by_polarity()
_CONTENT = content_words()
_SLOT_RE = re.compile(r"\{([A-Z_0-9]+)\}")


def _rng(seed: int, stream: str) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    return random.Random(f"rlhf-lightning-world/{seed}/{stream}")


# --- prompts ---------------------------------------------------------------------------------------
def sample_facts(rng: random.Random) -> Facts:
    """Uniformly drawn genre, lead actor and rating."""
    return Facts(rng.choice(GENRES), rng.choice(ACTORS), rng.choice(RATINGS))


def make_prompt(facts: Facts, template: int = 0) -> str:
    """The prompt text stating ``facts`` with ``PROMPT_TEMPLATES[template]``."""
    return PROMPT_TEMPLATES[template].format(GENRE=facts.genre, ACTOR=facts.actor, N=facts.rating)


def _sample_prompt(rng: random.Random) -> tuple[str, Facts]:
    facts = sample_facts(rng)
    return make_prompt(facts, rng.randrange(len(PROMPT_TEMPLATES))), facts


# --- sentences -------------------------------------------------------------------------------------
def _fill(rng: random.Random, template: str, facts: Facts, polar: dict[str, tuple[str, ...]] | None = None) -> str:
    """Fill ``template`` slot by slot; fact slots take ``facts``, polar slots draw from ``polar[slot]``."""
    polar = polar or {}

    def fill(match: re.Match) -> str:
        slot = match.group(1)
        if slot == "GENRE":
            return facts.genre
        if slot == "ACTOR":
            return facts.actor
        if slot == "N":
            return str(facts.rating)
        if slot in ("GASP_SG", "GASP_PL"):
            return rng.choice(GENRE_ASPECTS[facts.genre][0 if slot == "GASP_SG" else 1])
        if slot in polar:
            return rng.choice(polar[slot])
        if slot in ("ASP_SG", "ASP_PL"):
            # a quarter of aspects are the genre's signature elements (of the genre in ``facts``)
            if rng.random() < 0.25:
                return rng.choice(GENRE_ASPECTS[facts.genre][0 if slot == "ASP_SG" else 1])
            return rng.choice(GENERIC_ASPECTS_SG if slot == "ASP_SG" else GENERIC_ASPECTS_PL)
        return rng.choice(CLASSES[SLOT_ALIASES.get(slot, slot)])

    # Each occurrence is drawn on its own; a repeated aspect ("the plot and the plot") is redrawn
    # by the demonstration generator's repetition check.
    return _SLOT_RE.sub(fill, template)


def _polar_sentence(rng: random.Random, facts: Facts, target: float) -> str:
    """One sentence whose sentiment is close to ``target`` (+-0.5 or +-1)."""
    sign = 1.0 if target > 0 else -1.0
    strong = abs(target) == 1.0
    roll = rng.random()
    if strong and roll < 0.25:
        kind, value = "intensified", sign * rng.choice((0.5, 1.0))  # "very good" = 0.75, "very great" = 1
    elif not strong and roll < 0.15:
        kind, value = "negated", -sign * 1.0  # "not great" = -0.75
    elif not strong and roll < 0.25:
        kind, value = "diminished", sign * 1.0  # "somewhat great" = 0.5
    elif not strong and roll < 0.32:
        return rng.choice(TEMPLATES["recommend" if sign > 0 else "not_recommend"]).format(
            AUDIENCE=rng.choice(CLASSES["AUDIENCE"])
        )
    else:
        kind, value = "opinion", target
    templates = TEMPLATES[kind]
    if kind == "negated" and sign > 0:  # "i did not enjoy ..." can only be negative
        templates = tuple(t for t in templates if "{VBASE}" not in t)
    template = rng.choice(templates)
    polar = {slot: _POLAR[slot][value] for slot in _POLAR_SLOTS if value in _POLAR[slot]}
    if "{VBASE}" in template:
        polar["VBASE"] = _POLAR["VBASE"][0.5]
    return _fill(rng, template, facts, polar)


def _mixed_sentence(rng: random.Random, facts: Facts) -> str:
    first = rng.choice((-1.0, 1.0)) * rng.choice((0.5, 1.0))
    template = rng.choice(TEMPLATES["mixed"])
    return _fill(rng, template, facts, {"ADJ": _POLAR["ADJ"][first], "ADJ2": _POLAR["ADJ"][-first]})


def _neutral_sentence(rng: random.Random, facts: Facts, kind: str | None = None) -> str:
    kind = kind or rng.choices(("neutral", "genre_fact", "actor_fact"), (0.5, 0.25, 0.25))[0]
    return _fill(rng, rng.choice(TEMPLATES[kind]), facts)


def _sentence(rng: random.Random, facts: Facts, target: float) -> str:
    if target != 0.0:
        return _polar_sentence(rng, facts, target)
    if rng.random() < 0.35:
        return _mixed_sentence(rng, facts)
    return _neutral_sentence(rng, facts)


def _content(sentence: str) -> list[str]:
    return [t for t in tokenize_words(sentence) if t in _CONTENT]


def generate_demonstration(rng: random.Random, facts: Facts) -> str:
    """A good review for ``facts``: 2-5 sentences, polarity around the rating, facts right, no repeats."""
    n = rng.choices((2, 3, 4, 5), (0.2, 0.3, 0.3, 0.2))[0]
    rate_last = rng.random() < 0.15
    targets, weights = _TARGETS[facts.rating]
    sentences: list[str] = []
    used: set[str] = set()
    for i in range(n):
        for _ in range(20):
            if rate_last and i == n - 1:
                text = _neutral_sentence(rng, facts, "rating_fact")
            elif rng.random() < 0.15:
                text = _neutral_sentence(rng, facts, rng.choice(("genre_fact", "actor_fact")))
            else:
                text = _sentence(rng, facts, rng.choices(targets, weights)[0])
            words = _content(text)
            if text not in sentences and not used.intersection(words) and len(set(words)) == len(words):
                break
        sentences.append(text)
        used.update(_content(text))
    return " ".join(sentences)


# --- preference candidates -------------------------------------------------------------------------
def _wrong(rng: random.Random, facts: Facts) -> Facts:
    """``facts`` with one fact replaced by a wrong value."""
    which = rng.randrange(3)
    if which == 0:
        return facts._replace(genre=rng.choice([g for g in GENRES if g != facts.genre]))
    if which == 1:
        return facts._replace(actor=rng.choice([a for a in ACTORS if a != facts.actor]))
    return facts._replace(rating=rng.choice([r for r in RATINGS if r != facts.rating]))


def _perturb(rng: random.Random, sentence: str) -> str:
    """A disfluent version of ``sentence``: shuffled, a word dropped or doubled, or word salad."""
    tokens = tokenize_words(sentence)
    words, end = (tokens[:-1], tokens[-1]) if tokens and tokens[-1] == "." else (tokens, "")
    kind = rng.randrange(4) if words else 3
    if kind == 0 and len(words) > 1:
        rng.shuffle(words)
    elif kind == 1 and len(words) > 1:
        del words[rng.randrange(len(words))]
    elif kind == 2:
        i = rng.randrange(len(words))
        words.insert(i, words[i])
    else:
        vocab = world_words()
        words = [rng.choice(vocab) for _ in range(rng.randint(2, 10))]
    while words and not words[0].isalnum():  # a sentence never starts with "," (it would glue on decode)
        words.pop(0)
    return _join(words + ([end] if end else [])) if words else sentence


def _join(tokens: Sequence[str]) -> str:
    """Tokens back to text the way the tokenizer decodes them (punctuation glued to the word before)."""
    out = ""
    for tok in tokens:
        out += tok if (tok in ".,!?" or not out) else " " + tok
    return out


def _candidate_sentence(rng: random.Random, facts: Facts, persona: int) -> str:
    told = _wrong(rng, facts) if rng.random() < 0.2 else facts
    roll = rng.random()
    if roll < 0.1:
        text = _neutral_sentence(rng, told, "rating_fact")
    else:
        targets, weights = _TARGETS[persona] if roll < 0.75 else ((-1.0, -0.5, 0.0, 0.5, 1.0), None)
        text = _sentence(rng, told, rng.choices(targets, weights)[0])
    if rng.random() < 0.12:
        text = _perturb(rng, text)
    return text


def _candidate_sentences(rng: random.Random, facts: Facts) -> list[str]:
    persona = facts.rating if rng.random() < 0.35 else rng.choice(RATINGS)
    n = rng.choices((1, 2, 3, 4, 5, 6), (0.1, 0.2, 0.25, 0.2, 0.15, 0.1))[0]
    sentences = [_candidate_sentence(rng, facts, persona) for _ in range(n)]
    if rng.random() < 0.1:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(sentences))  # repeated sentence
    if rng.random() < 0.1:  # truncated: the last sentence stops mid-way
        tokens = tokenize_words(sentences[-1])
        sentences[-1] = _join(tokens[: rng.randint(1, max(1, len(tokens) - 2))]).rstrip(",")
    sentences = [s for s in sentences if s]
    return sentences or [_sentence(rng, facts, 0.0)]


def _edit(rng: random.Random, facts: Facts, sentences: list[str]) -> list[str]:
    """A one-sentence edit of ``sentences``: replace, delete, insert or perturb one sentence."""
    out = list(sentences)
    persona = rng.choice(RATINGS)
    kind = rng.randrange(4)
    i = rng.randrange(len(out))
    if kind == 0:
        out[i] = _candidate_sentence(rng, facts, persona)
    elif kind == 1 and len(out) > 1:
        del out[i]
    elif kind == 2:
        out.insert(rng.randrange(len(out) + 1), _candidate_sentence(rng, facts, persona))
    else:
        out[i] = _perturb(rng, out[i])
    return out


def generate_candidate(rng: random.Random, facts: Facts) -> str:
    """A completion from the broad candidate distribution used for preference pairs."""
    return " ".join(_candidate_sentences(rng, facts))


def _scores(prompt: str, completion: str) -> dict[str, float]:
    # Rounded once, here: stored scores and the tie test see the same numbers.
    return {name: round(s.total, 6) for name, s in score_all(prompt, completion).items()}


def generate_pair(rng: random.Random, objective: str, *, label_noise: float = 0.0, max_tries: int = 20) -> dict[str, Any]:
    """One preference record for ``objective``: two candidates for one prompt, ordered by gold score.

    The order is flipped with probability ``label_noise``. Candidates tied on ``objective`` are redrawn.
    """
    if objective not in GOLD_OBJECTIVES:
        raise ValueError(f"Unknown objective {objective!r}; choose from {GOLD_OBJECTIVES}.")
    while True:
        prompt, facts = _sample_prompt(rng)
        first = _candidate_sentences(rng, facts)
        a = " ".join(first)
        scores_a = _scores(prompt, a)
        for _ in range(max_tries):
            second = _edit(rng, facts, first) if rng.random() < 0.5 else _candidate_sentences(rng, facts)
            b = " ".join(second)
            if not b or b == a:
                continue
            scores_b = _scores(prompt, b)
            if scores_a[objective] != scores_b[objective]:
                break
        else:
            continue  # every redraw tied: new prompt
        if scores_a[objective] < scores_b[objective]:
            a, b, scores_a, scores_b = b, a, scores_b, scores_a
        if rng.random() < label_noise:
            a, b, scores_a, scores_b = b, a, scores_b, scores_a
        return {"prompt": prompt, "chosen": a, "rejected": b, "chosen_scores": scores_a, "rejected_scores": scores_b}


# --- files -----------------------------------------------------------------------------------------
@dataclass
class WorldConfig:
    """Sizes and seed of a generated world (the manifest's ``settings``)."""

    seed: int = 0
    n_demonstrations: int = 8000  # a 2-4 layer LM learns the templates in a few CPU minutes
    n_val_demonstrations: int = 500
    n_pairs: int = 12000  # per objective: the RM needs ~12k noisy pairs to pass 0.85 held-out accuracy
    n_val_pairs: int = 500  # per objective, noise-free
    n_prompts: int = 1000
    n_eval_prompts: int = 200
    label_noise: float = 0.1
    objectives: tuple[str, ...] = GOLD_OBJECTIVES
    version: int = field(default=WORLD_VERSION)

    def __post_init__(self) -> None:
        self.objectives = tuple(self.objectives)
        unknown = [o for o in self.objectives if o not in GOLD_OBJECTIVES]
        if unknown:
            raise ValueError(f"Unknown objectives {unknown}; choose from {GOLD_OBJECTIVES}.")
        if not 0.0 <= self.label_noise <= 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise}.")
        for name in ("n_demonstrations", "n_val_demonstrations", "n_pairs", "n_val_pairs", "n_prompts", "n_eval_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")


def build_world_tokenizer(save_dir: str | os.PathLike | None = None, *, model_max_length: int = 512):
    """The word-level tokenizer over the world's vocabulary (saved to ``save_dir`` when given)."""
    return build_word_level_tokenizer(world_words(), save_dir, model_max_length=model_max_length)


def _write_jsonl(path: Path, records: Iterator[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _demonstrations(seed: int, stream: str, n: int) -> Iterator[dict[str, Any]]:
    rng = _rng(seed, stream)
    for _ in range(n):
        prompt, facts = _sample_prompt(rng)
        yield {"prompt": prompt, "completion": generate_demonstration(rng, facts)}


def _prompts(seed: int, stream: str, n: int) -> Iterator[dict[str, Any]]:
    rng = _rng(seed, stream)
    for _ in range(n):
        prompt, facts = _sample_prompt(rng)
        yield {"prompt": prompt, "genre": facts.genre, "actor": facts.actor, "rating": facts.rating}


def _pairs(seed: int, stream: str, objective: str, n: int, noise: float) -> Iterator[dict[str, Any]]:
    rng = _rng(seed, stream)
    for _ in range(n):
        yield generate_pair(rng, objective, label_noise=noise)


def write_world(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_demonstrations: int = 8000,
    n_val_demonstrations: int = 500,
    n_pairs: int = 12000,
    n_val_pairs: int = 500,
    n_prompts: int = 1000,
    n_eval_prompts: int = 200,
    label_noise: float = 0.1,
    objectives: Sequence[str] = GOLD_OBJECTIVES,
    overwrite: bool = False,
) -> dict[str, str]:
    """Generate the embedded world into ``out_dir`` and return ``{name: path}`` of what it holds.

    Args:
        out_dir: folder to write (created if missing).
        seed: every file is a function of the seed and its own size.
        n_demonstrations / n_val_demonstrations: SFT records in ``sft_train`` / ``sft_val``.
        n_pairs / n_val_pairs: preference records per objective in ``pairs_<objective>_train`` / ``_val``.
        n_prompts / n_eval_prompts: records in ``prompts_train`` / ``prompts_eval``.
        label_noise: probability of swapping chosen and rejected in training pairs (val pairs: none).
        objectives: which gold objectives get pair files.
        overwrite: regenerate even if ``out_dir/world.json`` records the same settings.

    Returned names: ``sft_train``, ``sft_val``, ``pairs_<objective>_train``, ``pairs_<objective>_val``,
    ``prompts_train``, ``prompts_eval``, ``tokenizer`` (a folder) and ``manifest`` (``world.json``).
    """
    config = WorldConfig(
        seed=seed,
        n_demonstrations=n_demonstrations,
        n_val_demonstrations=n_val_demonstrations,
        n_pairs=n_pairs,
        n_val_pairs=n_val_pairs,
        n_prompts=n_prompts,
        n_eval_prompts=n_eval_prompts,
        label_noise=label_noise,
        objectives=tuple(objectives),
    )
    out = Path(out_dir)
    settings = asdict(config)
    settings["objectives"] = list(config.objectives)
    names = ["sft_train", "sft_val"]
    names += [f"pairs_{o}_{split}" for o in config.objectives for split in ("train", "val")]
    names += ["prompts_train", "prompts_eval"]
    paths = {name: str(out / f"{name}.jsonl") for name in names}
    paths["tokenizer"] = str(out / "tokenizer")
    paths["manifest"] = str(out / "world.json")

    manifest_path = out / "world.json"
    if not overwrite and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            manifest = {}
        if manifest.get("settings") == settings and all(os.path.exists(p) for p in paths.values()):
            return paths

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    c = config
    _write_jsonl(out / "sft_train.jsonl", _demonstrations(c.seed, "sft_train", c.n_demonstrations))
    _write_jsonl(out / "sft_val.jsonl", _demonstrations(c.seed, "sft_val", c.n_val_demonstrations))
    for objective in c.objectives:
        _write_jsonl(
            out / f"pairs_{objective}_train.jsonl",
            _pairs(c.seed, f"pairs_{objective}_train", objective, c.n_pairs, c.label_noise),
        )
        _write_jsonl(
            out / f"pairs_{objective}_val.jsonl", _pairs(c.seed, f"pairs_{objective}_val", objective, c.n_val_pairs, 0.0)
        )
    _write_jsonl(out / "prompts_train.jsonl", _prompts(c.seed, "prompts_train", c.n_prompts))
    _write_jsonl(out / "prompts_eval.jsonl", _prompts(c.seed, "prompts_eval", c.n_eval_prompts))
    tokenizer = build_world_tokenizer(out / "tokenizer")
    manifest = {
        "world_version": WORLD_VERSION,
        "settings": settings,
        "vocab_size": len(tokenizer),
        "objectives": list(c.objectives),
        "files": {name: os.path.relpath(p, out) for name, p in paths.items() if name != "manifest"},
        "sizes": {
            "sft_train": c.n_demonstrations,
            "sft_val": c.n_val_demonstrations,
            **{f"pairs_{o}_train": c.n_pairs for o in c.objectives},
            **{f"pairs_{o}_val": c.n_val_pairs for o in c.objectives},
            "prompts_train": c.n_prompts,
            "prompts_eval": c.n_eval_prompts,
        },
        "generation_seconds": round(time.perf_counter() - start, 3),
    }
    tmp = manifest_path.with_name("world.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)  # written last: its presence means the world is complete
    return paths
