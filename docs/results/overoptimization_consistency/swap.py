"""Probe (not part of the library): fact-swap pairs. Chosen = a standard pair's better review whose fact words are replaced
by the prompt's (made consistent where it mentions a fact); rejected = the same text with one mentioned fact
word swapped for a wrong one. Mixed 50/50 with the standard pairs."""
import json, random, re
from rlhf_lightning.synthetic.lexicon import ACTORS, GENRES, GENRE_KEYWORDS
from rlhf_lightning.synthetic.scorers import parse_prompt
from rlhf_lightning.synthetic.world import _scores
rng = random.Random(0)
recs = [json.loads(l) for l in open("runs/cons/w12k/pairs_consistency_train.jsonl")]
out = []
for i, r in enumerate(recs):
    if i % 2 == 0:
        out.append(r); continue
    facts = parse_prompt(r["prompt"])
    text = r["chosen"] if r["chosen_scores"]["consistency"] >= r["rejected_scores"]["consistency"] else r["rejected"]
    words = text.split(" ")
    idx = [j for j, w in enumerate(words) if w.strip(".,!?") in ACTORS or w.strip(".,!?") in GENRES]
    if not idx:
        out.append(r); continue
    j = rng.choice(idx)
    w = words[j].strip(".,!?"); tail = words[j][len(w):]
    pool = ACTORS if w in ACTORS else GENRES
    words2 = list(words); words2[j] = rng.choice([x for x in pool if x != w]) + tail
    a, b = text, " ".join(words2)
    sa, sb = _scores(r["prompt"], a), _scores(r["prompt"], b)
    if sa["consistency"] == sb["consistency"]:
        out.append(r); continue
    if sa["consistency"] < sb["consistency"]:
        a, b, sa, sb = b, a, sb, sa
    out.append({"prompt": r["prompt"], "chosen": a, "rejected": b, "chosen_scores": sa, "rejected_scores": sb})
open("runs/cons/w12k_swap.jsonl", "w").writelines(json.dumps(x) + "\n" for x in out)
print(len(out), sum(1 for x, r in zip(out, recs) if x is not r))
