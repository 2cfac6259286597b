#!/usr/bin/env bash
# GPU checks, for a machine with a CUDA GPU (the device tool runs this from the repository root):
#   1. the attention equivalence suite on CUDA (fp32, bf16; flex with its backward; flash-attn and cuDNN when present)
#   2. the attention benchmark in bf16 (flash or sdpa vs naive, and vs the flash-attn package when installed)
#   3. bf16-mixed training of a GPT-2-small-shaped model (12 x 768, block 1024) with sdpa and torch.compile:
#      tokens/s and MFU against the GPU's bf16 peak
#   4. sampling speed on the GPU: KV cache on/off, the compiled and the AOTInductor-packaged decoding steps, batch 8
#   5. the attention self-check (flex, sdpa, flash-attn vs naive at a GPT-2 shape in bf16): its start-up cost
#   6. experiment=gpt2_124m (its DDP preset, 524,288 tokens a step) for 30 steps: tokens/s and MFU
#   7. DDP on 2 GPUs vs 1 GPU accumulating 2 (with two or more GPUs)
#   8. FSDP (trainer=fsdp) vs DDP on every GPU here, bf16-mixed, 20 steps: the losses side by side
#   9. optim=muon (minitx.muon: batched Newton-Schulz in bf16) vs optim=adamw on the GPU: val/loss and tokens/s
# The device image has torch, lightning, tokenizers and pytest but no network; hydra-core, omegaconf, datasets and
# wandb come from wheels downloaded beforehand on a machine with a registry:
#   pip download -d .gpu-wheels hydra-core datasets wandb      (then run with carry=[".gpu-wheels"])
set -uo pipefail
export WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
if [ -d .gpu-wheels ]; then
  python3 -m pip install -q --no-index --find-links .gpu-wheels hydra-core datasets wandb
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || echo "warning: editable install failed"

rates() {  # the last $2 logged rows of run directory $1's csv/metrics.csv: loss, tokens/s, MFU
  python3 - "$1" "$2" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(f"{sys.argv[1]}/csv/metrics.csv")) if r.get("tokens_per_sec")]
for r in rows[-int(sys.argv[2]):]:
    print(f"step {r['step']}: loss {float(r['train/loss']):.3f}, {float(r['tokens_per_sec']):,.0f} tokens/s, "
          f"mfu {float(r['mfu']):.1%}")
PY
}

echo "== 1. equivalence suite on $(python3 -c 'import torch; print(torch.cuda.get_device_name())')"
python3 -m pytest -q -rs -p no:cacheprovider tests/test_attention_kernels.py 2>&1 | tail -40

echo "== 2. attention benchmark, bf16"
python3 scripts/bench_attention.py --dtype bfloat16 --seq 1024,2048,4096,8192 --kernels naive,sdpa,flex,flash

echo "== 3. GPT-2-small shape, bf16-mixed, sdpa, compile"
out=$(mktemp -d)
timeout 300 minitx-train model.n_layer=12 model.n_head=12 model.n_embd=768 model.block_size=1024 \
  model.compile=true trainer.precision=bf16-mixed data.batch_size=16 trainer.max_steps=80 \
  trainer.val_check_interval=80 trainer.log_every_n_steps=10 data.val_batches=4 optim.warmup_steps=10 \
  logger=csv sample.max_new_tokens=0 trainer.enable_progress_bar=false "hydra.run.dir=$out" 2>&1 | tail -5
rates "$out" 4

echo "== 4. sampling: KV cache on/off, the compiled and packaged decoding steps, batch 8 (nanoGPT's default shape)"
timeout 300 python3 scripts/bench_sample.py --device cuda --repeats 2 --new 200 2>&1 | tail -24

echo "== 5. the attention self-check on the GPU: what it costs at start-up, and which kernel each run keeps"
timeout 240 python3 scripts/bench_kernel_check.py 2>&1 | tail -12

echo "== 6. experiment=gpt2_124m, the GPU recipe, through its DDP preset: 30 optimizer steps of 524,288 tokens on the"
echo "   built-in corpus (no network here; FineWeb-edu is the recipe's data), BPE 50,257, bf16, compile: tokens/s, MFU"
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
out=$(mktemp -d)
timeout 420 minitx-train experiment=gpt2_124m data.hub_id=null data.val_fraction=0.05 trainer.devices="$ngpu" \
  trainer.max_steps=30 trainer.val_check_interval=30 trainer.log_every_n_steps=5 optim.warmup_steps=10 \
  logger=csv sample.max_new_tokens=0 trainer.enable_progress_bar=false "hydra.run.dir=$out" 2>&1 | tail -8
rates "$out" 3

echo "== 7. DDP on 2 GPUs vs 1 GPU accumulating 2: the same optimizer steps (losses side by side; TF32 matmuls differ slightly)"
if [ "$ngpu" -ge 2 ]; then
  for n in 1 2; do
    timeout 240 minitx-train trainer=ddp trainer.devices=$n model.n_layer=4 model.n_embd=256 model.block_size=256 \
      data.batch_size=16 trainer.tokens_per_step=8192 trainer.max_steps=20 trainer.val_check_interval=20 \
      trainer.log_every_n_steps=5 logger=csv sample.max_new_tokens=0 trainer.enable_progress_bar=false \
      "hydra.run.dir=$out/ddp$n" 2>&1 | grep "global batch"
  done
  python3 - "$out" <<'PY'
import csv, sys
loss = {n: {r["step"]: r["train/loss"] for r in csv.DictReader(open(f"{sys.argv[1]}/ddp{n}/csv/metrics.csv"))
            if r.get("train/loss")} for n in (1, 2)}
for step in sorted(loss[1], key=int):
    print(f"step {step}: 1 GPU {float(loss[1][step]):.5f}  2 GPUs {float(loss[2].get(step, 'nan')):.5f}")
PY
else
  echo "one GPU: DDP across GPUs needs two (step 6 ran the DDP strategy with one process)"
fi

echo "== 8. FSDP (trainer=fsdp: FSDP2, NCCL) vs DDP on every GPU here, bf16-mixed, 20 steps: train/loss side by side"
for preset in fsdp ddp; do
  timeout 240 minitx-train trainer=$preset trainer.devices="$ngpu" trainer.precision=bf16-mixed \
    model.n_layer=6 model.n_head=6 model.n_embd=384 model.block_size=256 data.batch_size=16 data.val_batches="$ngpu" \
    trainer.max_steps=20 trainer.val_check_interval=20 trainer.log_every_n_steps=5 optim.warmup_steps=5 \
    logger=csv sample.max_new_tokens=0 trainer.enable_progress_bar=false "hydra.run.dir=$out/$preset" 2>&1 \
    | grep -E "fsdp:|rror|val/loss" | tail -3
done
python3 - "$out" <<'PY'
import csv, sys
loss = {s: {r["step"]: float(r["train/loss"]) for r in csv.DictReader(open(f"{sys.argv[1]}/{s}/csv/metrics.csv"))
            if r.get("train/loss")} for s in ("fsdp", "ddp")}
for step in sorted(loss["fsdp"], key=int):  # bf16: FSDP gathers bf16 weights, DDP autocasts fp32 ones: close, not equal
    print(f"step {step}: fsdp {loss['fsdp'][step]:.4f}  ddp {loss['ddp'].get(step, float('nan')):.4f}")
PY

echo "== 9. optim=muon vs optim=adamw on the GPU, 6 x 384 with QK-norm, bf16-mixed, 200 steps on the built-in corpus"
for optim in muon adamw; do
  timeout 240 minitx-train optim=$optim model.qk_norm=true model.n_layer=6 model.n_head=6 model.n_embd=384 \
    model.block_size=256 data.batch_size=32 trainer.precision=bf16-mixed trainer.max_steps=200 \
    trainer.val_check_interval=200 trainer.log_every_n_steps=50 logger=csv sample.max_new_tokens=0 \
    trainer.enable_progress_bar=false "hydra.run.dir=$out/$optim" 2>&1 | grep -E "rror|tokens/s|val/loss: best"
done
