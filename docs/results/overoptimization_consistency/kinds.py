"""RM accuracy vs gold on val consistency pairs, split by whether a review names a wrong actor/genre."""
import json, sys
from rlhf_lightning.rewards.reward_model import RewardModelSource
from rlhf_lightning.synthetic.lexicon import ACTORS, GENRES, GENRE_KEYWORDS, tokenize_words
from rlhf_lightning.synthetic.scorers import parse_prompt
recs = [json.loads(l) for l in open("runs/front/world/pairs_consistency_val.jsonl")]
def wrong(r, t):
    f = parse_prompt(r["prompt"])
    for w in tokenize_words(t):
        g = w if w in GENRES else GENRE_KEYWORDS.get(w)
        if (g is not None and g != f.genre) or (w in ACTORS and w != f.actor):
            return True
    return False
kind = ["fact" if wrong(r, r["chosen"]) or wrong(r, r["rejected"]) else "tone/rating" for r in recs]
e = lambda r: (parse_prompt(r["prompt"]).rating - 3) / 2
heur = [abs(r["rejected_scores"]["sentiment"] - e(r)) > abs(r["chosen_scores"]["sentiment"] - e(r)) for r in recs]
prompts = [r["prompt"] for r in recs]
for export in sys.argv[1:]:
    src = RewardModelSource(export, batch_size=256)
    ok = (src(prompts, [r["chosen"] for r in recs]) > src(prompts, [r["rejected"] for r in recs])).tolist()
    parts = [f"{k} n={kind.count(k)} rm {sum(o for o, kk in zip(ok, kind) if kk == k)/kind.count(k):.3f} "
             f"heuristic {sum(h for h, kk in zip(heur, kind) if kk == k)/kind.count(k):.3f}" for k in ("fact", "tone/rating")]
    print(f"{export}: {sum(ok)/len(ok):.3f} | " + " | ".join(parts), flush=True)
