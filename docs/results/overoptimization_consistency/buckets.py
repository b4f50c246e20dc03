"""Held-out accuracy of consistency RM exports vs gold, overall and by |gold margin| bucket."""
import json, sys
from rlhf_lightning.rewards.reward_model import RewardModelSource
recs = [json.loads(l) for l in open("runs/front/world/pairs_consistency_val.jsonl")]
m = [r["chosen_scores"]["consistency"] - r["rejected_scores"]["consistency"] for r in recs]
prompts = [r["prompt"] for r in recs]
edges = [(0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 3)]
for export in sys.argv[1:]:
    src = RewardModelSource(export, batch_size=256)
    c = src(prompts, [r["chosen"] for r in recs]); rj = src(prompts, [r["rejected"] for r in recs])
    ok = (c > rj).float().tolist()
    parts = []
    for lo, hi in edges:
        sel = [o for o, x in zip(ok, m) if lo <= abs(x) < hi]
        parts.append(f"[{lo},{hi}) n={len(sel)} {sum(sel)/len(sel):.3f}")
    print(f"{export}: acc {sum(ok)/len(ok):.3f} | " + " | ".join(parts), flush=True)
