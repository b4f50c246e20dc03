"""The embedded world: a seeded movie-review task with a word-level tokenizer and gold scorers.

``write_world(out_dir)`` (or ``python -m rlhf_lightning.synthetic --out DIR``) writes demonstrations,
preference pairs per gold objective, prompt sets, the tokenizer and a manifest. The gold scorers
(``get_scorer``, ``score_texts``, ``score_all``) score any ``(prompt, completion)`` text per sentence and
per sequence. See ``world.py`` and ``scorers.py`` for the details.
"""

from rlhf_lightning.synthetic.baselines import unigram_perplexity
from rlhf_lightning.synthetic.lexicon import world_words
from rlhf_lightning.synthetic.scorers import (
    GOLD_OBJECTIVES,
    SCORE_RANGES,
    ConsistencyScorer,
    Facts,
    FluencyScorer,
    GoldScorer,
    SentenceScores,
    SentimentScorer,
    get_scorer,
    parse_prompt,
    score_all,
    score_texts,
    split_sentences,
)
from rlhf_lightning.synthetic.tokenizer import build_word_level_tokenizer
from rlhf_lightning.synthetic.world import (
    WORLD_VERSION,
    WorldConfig,
    build_world_tokenizer,
    generate_candidate,
    generate_demonstration,
    generate_pair,
    make_prompt,
    sample_facts,
    write_world,
)

__all__ = [
    "GOLD_OBJECTIVES",
    "SCORE_RANGES",
    "WORLD_VERSION",
    "ConsistencyScorer",
    "Facts",
    "FluencyScorer",
    "GoldScorer",
    "SentenceScores",
    "SentimentScorer",
    "WorldConfig",
    "build_word_level_tokenizer",
    "build_world_tokenizer",
    "generate_candidate",
    "generate_demonstration",
    "generate_pair",
    "get_scorer",
    "make_prompt",
    "parse_prompt",
    "sample_facts",
    "score_all",
    "score_texts",
    "split_sentences",
    "unigram_perplexity",
    "world_words",
    "write_world",
]
