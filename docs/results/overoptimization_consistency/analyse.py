import json, statistics, sys
from transformers import AutoTokenizer
from rlhf_lightning.synthetic.scorers import parse_prompt, split_sentences
w = sys.argv[1]
tok = AutoTokenizer.from_pretrained(f"{w}/tokenizer")
for split in ("train", "val"):
    recs = [json.loads(l) for l in open(f"{w}/pairs_consistency_{split}.jsonl")]
    m = [r["chosen_scores"]["consistency"] - r["rejected_scores"]["consistency"] for r in recs]
    am = sorted(abs(x) for x in m)
    n = len(am)
    print(split, n, "flipped", sum(x < 0 for x in m)/n, "|margin| quantiles", [round(am[int(q*n)],3) for q in (0.1,0.25,0.5,0.75,0.9)],
          "share<0.1", sum(x<0.1 for x in am)/n, "share<0.25", sum(x<0.25 for x in am)/n)
    pl = [len(tok(r["prompt"])["input_ids"]) for r in recs]
    cl = [len(tok(r["chosen"])["input_ids"]) for r in recs] + [len(tok(r["rejected"])["input_ids"]) for r in recs]
    print("  prompt tokens max/mean", max(pl), statistics.mean(pl), "completion max/mean", max(cl), statistics.mean(cl),
          "share prompt+compl>128", sum(p + c > 128 for p, c in zip(pl * 2, cl)) / len(cl))
    # heuristics on noise-free ordering (sign of m)
    sgn = [1 if x > 0 else -1 for x in m]
    # sentiment-vs-expected heuristic: closer sentiment to expected polarity
    def h_sent(r):
        e = (parse_prompt(r["prompt"]).rating - 3) / 2
        return -abs(r["chosen_scores"]["sentiment"] - e) + abs(r["rejected_scores"]["sentiment"] - e)
    def acc(f):
        vals = [f(r) for r in recs]
        return sum((v > 0) == (s > 0) for v, s in zip(vals, sgn) if v != 0) / n + 0.5 * sum(v == 0 for v in vals) / n
    print("  acc: closer total sentiment to rating", round(acc(h_sent), 3),
          "| fluency higher", round(acc(lambda r: r["chosen_scores"]["fluency"] - r["rejected_scores"]["fluency"]), 3),
          "| shorter", round(acc(lambda r: len(r["rejected"]) - len(r["chosen"])), 3),
          "| sentiment higher", round(acc(lambda r: r["chosen_scores"]["sentiment"] - r["rejected_scores"]["sentiment"]), 3))
