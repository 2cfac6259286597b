#!/usr/bin/env bash
# Two "nodes" on this machine: two torchrun node ranks over localhost (static rendezvous), one CPU process each
# (gloo), training a tiny model a few steps with trainer=ddp trainer.num_nodes=2; then the same run on one "node" with
# 2 processes started by Lightning. Prints both runs' train/loss and val/loss per step and the run directories left.
#   scripts/multinode_sim.sh [WORK_DIR]        (default: a new temporary directory)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
python=${PYTHON:-python}
port=${PORT:-29533}
mkdir -p "$work" && cd "$work"
export WANDB_MODE=offline PYTHONWARNINGS=ignore PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

"$python" - <<'EOF'
import random
rng = random.Random(0)
words = [["big", "small", "red"], ["cat", "dog"], ["sat", "ran"], ["on", "under"], ["mat", "log"]]
lines = ["the {} {} {} {} the {}.".format(*(rng.choice(w) for w in words)) for _ in range(600)]
open("corpus.txt", "w").write("\n".join(lines) + "\n")
EOF

run=(model.n_layer=2 model.n_head=2 model.n_embd=32 model.block_size=32 data.batch_size=4 data.val_batches=4
     data.path=corpus.txt trainer.max_steps=6 trainer.log_every_n_steps=1 trainer.val_check_interval=1000
     trainer.tokens_per_step=256 trainer.accelerator=cpu trainer.enable_progress_bar=false optim.warmup_steps=2
     sample.max_new_tokens=0 logger=csv trainer=ddp)

echo "== 2 nodes x 1 process (torchrun, static rendezvous on 127.0.0.1:$port)"
for node in 0 1; do
  "$python" -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank $node \
    --master-addr 127.0.0.1 --master-port "$port" \
    -m minitx.train "${run[@]}" trainer.num_nodes=2 hydra.run.dir="$work/nodes2" > "node$node.log" 2>&1 &
  pids[$node]=$!
done
status=0
for node in 0 1; do wait "${pids[$node]}" || { status=$?; echo "node $node failed ($status):"; tail -20 "node$node.log"; }; done
[ $status -eq 0 ] || exit $status
grep -h "Initializing distributed\|global batch" node0.log node1.log

echo "== 1 node x 2 processes (Lightning's launcher)"
"$python" -m minitx.train "${run[@]}" trainer.devices=2 hydra.run.dir="$work/node1x2" > node1x2.log 2>&1
grep -h "global batch" node1x2.log

echo "== run directories left in $work"
find "$work" -mindepth 1 -maxdepth 1 -type d | sort
echo "nodes2/: $(ls -A "$work/nodes2" | tr '\n' ' ')"

"$python" - "$work" <<'EOF'
import csv, sys
from pathlib import Path

def losses(run):
    out = {}
    for row in csv.DictReader(open(Path(sys.argv[1]) / run / "csv" / "metrics.csv")):
        for key in ("train/loss", "val/loss"):
            if row.get(key):
                out[(int(row["step"]), key)] = float(row[key])
    return out

a, b = losses("nodes2"), losses("node1x2")
print(f"{'step':>4}  {'metric':<10} {'2 nodes x 1':>12} {'1 node x 2':>12}  |diff|")
for k in sorted(a.keys() | b.keys()):
    x, y = a.get(k, float("nan")), b.get(k, float("nan"))
    print(f"{k[0]:>4}  {k[1]:<10} {x:>12.7f} {y:>12.7f}  {abs(x - y):.1e}")
print("max |diff|:", max(abs(a[k] - b[k]) for k in a.keys() & b.keys()))
EOF
