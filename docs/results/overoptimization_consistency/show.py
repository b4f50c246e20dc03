import csv, glob, sys
for run in sys.argv[1:]:
    rows = list(csv.DictReader(open(glob.glob(f"runs/cons/{run}/logs/*/metrics.csv")[0])))
    val = [(r["step"], round(float(r["val/accuracy"]), 3)) for r in rows if r.get("val/accuracy")]
    tr = [round(float(r["train/epoch_accuracy"]), 3) for r in rows if r.get("train/epoch_accuracy")]
    print(run, "val", val, "train epochs", tr[-1:] )
