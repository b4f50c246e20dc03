"""Probe (not part of the library): rating-mirrored pairs. Each standard pair (prompt rated r) is followed by the same two reviews under
the same prompt rated 6 - r (r = 3: 1 or 5), ordered by gold there; ties dropped. Label noise as the world's (0.1)."""
import json, random, sys
from rlhf_lightning.synthetic.scorers import parse_prompt
from rlhf_lightning.synthetic.world import _scores
rng = random.Random(0)
n_base = int(sys.argv[1]); out_path = sys.argv[2]
recs = [json.loads(l) for l in open("runs/cons/w12k/pairs_consistency_train.jsonl")][:n_base]
out = []
for r in recs:
    out.append(r)
    rating = parse_prompt(r["prompt"]).rating
    new = 6 - rating if rating != 3 else rng.choice((1, 5))
    prompt = r["prompt"].replace(f"{rating} out of 5", f"{new} out of 5")
    assert prompt != r["prompt"] and parse_prompt(prompt).rating == new
    a, b = r["chosen"], r["rejected"]
    sa, sb = _scores(prompt, a), _scores(prompt, b)
    if sa["consistency"] == sb["consistency"]:
        continue
    if sa["consistency"] < sb["consistency"]:
        a, b, sa, sb = b, a, sb, sa
    if rng.random() < 0.1:
        a, b, sa, sb = b, a, sb, sa
    out.append({"prompt": prompt, "chosen": a, "rejected": b, "chosen_scores": sa, "rejected_scores": sb})
open(out_path, "w").writelines(json.dumps(x) + "\n" for x in out)
print(len(out))
