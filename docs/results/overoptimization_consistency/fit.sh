#!/bin/bash
# usage: fit.sh NAME TRAIN_FILE STEPS VALEVERY SEED [extra overrides...]
# runs/front/configs/modpo_margin_rm.yaml is configs/modpo_margin_rm.yaml as scripts/morlhf_vs_modpo.py
# --run-dir runs/front --quick materialised it (paths into runs/front/world). Writes runs/cons/NAME.
name=$1; train=$2; steps=$3; every=$4; seed=$5; shift 5
d=runs/cons/$name
mkdir -p $d
. .venv/bin/activate  # the project venv
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
/usr/bin/time -f "%U user %S sys %e wall" nice -n 10 rlhf-lightning fit --config runs/front/configs/modpo_margin_rm.yaml \
  --seed_everything=$seed --trainer.max_steps=$steps --trainer.val_check_interval=$every \
  --trainer.default_root_dir=$d --trainer.logger.init_args.save_dir=$d \
  --data.init_args.train_file=$train --data.init_args.val_file=runs/front/world/pairs_consistency_val.jsonl \
  --model.init_args.optim.warmup_steps=$(( steps / 10 > 1 ? steps / 10 : 1 )) "$@" > $d/log.txt 2>&1
echo "exit $?" >> $d/log.txt
