#!/usr/bin/env bash
# Issue 9's GPU figures in one command, under 8 minutes on one H100/H200:
#   ViT-B/16 student, MAE ViT-B/16 + CLIP ViT-B/16 architectures (random weights, nothing downloaded),
#   batch 256, bf16 autocast: eager at drop ratio 0.3 (67/196 kept) and 0 (all kept), a short eager run
#   that counts host syncs per step (--sync-debug), then torch.compile'd at 0.3 and 0. Each run is cut
#   to what is left of a 450 s budget.
#
#   bash benchmarks/gpu.sh                 # results in $OUT (device tool) or benchmarks/results/
#
# Then, within the budget: `hd bench data` by decode path (pil, cpu, gpu) on synthetic ImageNet-sized JPEG
# shards made here, the real step fed by those shards against the synthetic batch (`--data`), and `hd distill`
# end to end on them (bf16, compiled, SIGTERM after the first checkpoint, `--resume auto`).
# Writes 3 files: gpu_results.json (every run's `hd bench ... --json` object, by name),
# gpu_summary.md (a markdown table for docs/performance.md) and gpu.log (stderr of all runs).
# Needs python3 with torch, timm, accelerate, typer, rich, safetensors, huggingface_hub, webdataset and
# braceexpand. The device image lacks the last two: carry them as wheels in .whl/ (pure Python), made
# here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7
# (two small pure-Python wheels, checked to download) and pass carry=[".whl"]; this script installs them
# into /tmp/site. Then, e.g.: run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=540).
set -uo pipefail
cd "$(dirname "$0")/.."
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
TMP=$(mktemp -d)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/hd-inductor}
LOG="$RES/gpu.log"
: > "$LOG"

if ! $PY -c "import webdataset, braceexpand" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "installing .whl/ failed" | tee -a "$LOG"; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "python3 lacks webdataset/braceexpand and .whl/ holds no wheels: see the header of $0" | tee -a "$LOG"
    exit 3
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" \
  2>&1 | tee -a "$LOG"

COMMON=(--student vit_base_patch16_224 --teachers mae,clip --batch-size 256 --dtype bf16 --steps 20)
COMPILE=--compile
if [ -n "${HD_GPU_SH_SMOKE:-}" ]; then  # check this script's flow on a CPU: tiny models, nothing compiled
  COMMON=(--cpu --img-size 32 --patch-size 4 --dim 48 --depth 12 --heads 3 --batch-size 2 --steps 2 --gemm-size 64)
  COMPILE=
fi
START=$SECONDS
BUDGET=${HD_GPU_SH_BUDGET:-450}  # seconds for all runs: the script ends well inside 8 minutes
run() {  # run NAME TIMEOUT_S ARGS...  (the timeout is cut to what is left of BUDGET)
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped, budget spent" | tee -a "$LOG"; return; fi
  echo "== $name: hd bench distill ${COMMON[*]} $* --json  ($((SECONDS - START)) s elapsed, limit $limit s)" | tee -a "$LOG"
  timeout "$limit" $PY -m hdcli bench distill "${COMMON[@]}" "$@" --json > "$TMP/$name.json" 2>> "$LOG"
  local rc=$?
  echo "== $name: rc $rc after $((SECONDS - START)) s" | tee -a "$LOG"
}
run eager_keep34 100 --drop-ratio 0.3 --warmup 5 --reference
run eager_keep100 90 --drop-ratio 0 --warmup 5
run syncs_keep34 60 --drop-ratio 0.3 --warmup 3 --steps 3 --sync-debug --no-breakdown --no-gemm
# paying for the teachers once (issue 25): two students from one teacher pass against their single steps, and
# the teachers at fp32 against the default (auto = bf16 teachers on CUDA, as eager_keep34 ran)
run students2 100 --drop-ratio 0.3 --warmup 3 --steps 8 --students 2 --no-breakdown --no-gemm
run teachers_fp32 60 --drop-ratio 0.3 --warmup 3 --steps 8 --teacher-dtype fp32 --no-breakdown --no-gemm
# a target cache's step (issue 26): targets computed once, alternating with the online step
run cached_targets 60 --drop-ratio 0.3 --warmup 3 --steps 8 --cached-targets --no-breakdown --no-gemm
run compiled_keep34 200 --drop-ratio 0.3 --warmup 8 $COMPILE
run compiled_keep100 200 --drop-ratio 0 --warmup 8 $COMPILE

# Can this machine's CPUs decode as fast as the GPU trains? Synthetic 500x375 JPEG shards, METHOD.md's crop, by
# decode path (pil: the reference, cpu, gpu: nvJPEG + crop/resize on the device), with all CPUs but one and with
# 2 workers; --step-rate from the compiled keep-34% run says how many cores each path needs.
W=$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))
RATE=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['images_per_s'])" "$TMP/compiled_keep34.json" 2>/dev/null || echo 4000)
SHARDS="$TMP/shards"
NIMG=1024; DBATCH=128; DB=6
if [ -n "${HD_GPU_SH_SMOKE:-}" ]; then NIMG=64; DBATCH=8; DB=2; fi
data() {  # data NAME TIMEOUT_S ARGS...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET + 20 - (SECONDS - START)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped, budget spent" | tee -a "$LOG"; return; fi
  echo "== $name: hd bench data $SHARDS $* ($((SECONDS - START)) s elapsed, limit $limit s)" | tee -a "$LOG"
  timeout "$limit" $PY -m hdcli bench data "$SHARDS" --batch-size $DBATCH --batches $DB --rounds 2 --warmup 2 \
    --step-rate "$RATE" "$@" --json > "$TMP/$name.json" 2>> "$LOG"
  echo "== $name: rc $? after $((SECONDS - START)) s" | tee -a "$LOG"
}
$PY benchmarks/jpeg_shards.py "$SHARDS" --images $NIMG >> "$LOG" 2>&1 || echo "== shards: failed" | tee -a "$LOG"
data data_all_cpus 90 --workers $W
data data_2_workers 60 --workers 2 --decode cpu,gpu

# The real step on real shards: engine steps alternate the shard loader (gpu decode) and the synthetic batch.
run data_step 120 --drop-ratio 0.3 --warmup 3 --steps 6 --data "$SHARDS" --data-workers $W --decode gpu \
  --no-breakdown --no-gemm $COMPILE

# hd distill end to end on the shards: bf16, compiled, checkpoints every 20 steps, SIGTERM after the first one,
# then --resume auto to the end (50 steps); the log's images/s against the synthetic-batch step above.
E2E=(--student vit_base_patch16_224 --teachers random:vit_base_patch16_224.mae,random:vit_base_patch16_clip_224.openai
     --data "$SHARDS" -b 128 --steps 50 --save-every 20 --log-every 10 --mixed-precision bf16 $COMPILE
     --num-workers $W --set optim.warmup_steps=10 --out "$TMP/e2e")
if [ -n "${HD_GPU_SH_SMOKE:-}" ]; then
  E2E=(--student vit_base_patch16_224 --teachers random:vit_base_patch16_224.mae,random:vit_base_patch16_clip_224.openai
       --img-size 32 --patch-size 4 --set "student.kwargs={embed_dim = 48, depth = 12, num_heads = 3}"
       --set "distill.teacher_kwargs={patch_size = 4, embed_dim = 48, depth = 12, num_heads = 3}"
       --data "$SHARDS" -b 4 --steps 12 --save-every 4 --log-every 2 --mixed-precision no --cpu --num-workers 1
       --set optim.warmup_steps=2 --out "$TMP/e2e")
fi
left=$((BUDGET + 60 - (SECONDS - START)))
if [ "$left" -ge 60 ]; then
  echo "== e2e: hd distill ${E2E[*]} ($((SECONDS - START)) s elapsed, limit $left s)" | tee -a "$LOG"
  $PY -m hdcli distill "${E2E[@]}" >> "$LOG" 2>&1 &
  pid=$!
  t0=$SECONDS
  until [ -d "$TMP/e2e/checkpoints/step_0000020" ] || [ -d "$TMP/e2e/checkpoints/step_0000004" ] \
      || ! kill -0 $pid 2>/dev/null || [ $((SECONDS - t0)) -ge $((left / 2)) ]; do sleep 1; done
  kill -TERM $pid 2>/dev/null; wait $pid; echo "== e2e: first segment rc $? after $((SECONDS - START)) s" | tee -a "$LOG"
  left=$((BUDGET + 60 - (SECONDS - START)))
  timeout "$left" $PY -m hdcli distill --out "$TMP/e2e" --resume auto >> "$LOG" 2>&1
  rc=$?
  echo "== e2e: resumed segment rc $rc after $((SECONDS - START)) s" | tee -a "$LOG"
  [ -f "$TMP/e2e/metrics.jsonl" ] && cp "$TMP/e2e/metrics.jsonl" "$TMP/e2e_metrics.jsonl.txt"
  $PY -c "import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if 'img_per_s' in l]; \
print(json.dumps({'rc': $rc, 'records': len(r), 'last_step': r[-1]['step'] if r else None, \
'img_per_s': sorted(x['img_per_s'] for x in r)[len(r)//2] if r else None}))" "$TMP/e2e/metrics.jsonl" \
    > "$TMP/e2e.json" 2>> "$LOG"
else
  echo "== e2e: skipped, budget spent" | tee -a "$LOG"
fi

$PY - "$TMP" "$RES" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
tmp, res = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
for f in sorted(tmp.glob("*.json")):  # data.json: hd bench data
    try:
        runs[f.stem] = json.loads(f.read_text())
    except ValueError:
        runs[f.stem] = None
(res / "gpu_results.json").write_text(json.dumps(runs, indent=1) + "\n")
rows = ["| run | keep | compiled | img/s | step ms | TFLOP/s | MFU | of matmul | peak mem GB | MIM / feat / student / optim ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
dev = ""
for name in ("eager_keep34", "eager_keep100", "compiled_keep34", "compiled_keep100"):
    r = runs.get(name)
    if not r:
        rows.append(f"| {name} | failed or timed out (see gpu.log) | | | | | | | | |")
        continue
    c = r["config"]
    dev = c["device"]
    b = r["breakdown_ms"] or {}
    parts = " / ".join(f"{b[k]:.1f}" for k in ("mim_teacher", "feat_teacher", "student", "optimizer")) if b else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    og = f"{100 * r['of_gemm']:.1f}%" if r["of_gemm"] is not None else "-"
    rows.append(f"| {name} | {c['n_keep']}/{c['n_patches']} | {'yes' if c['compile'] else 'no'} | {r['images_per_s']:,.0f} | "
                f"{r['step_ms']:.1f} | {r['tflops']:.1f} | {mfu} | {og} | {r['peak_mem_mb'] / 1024:.1f} | {parts} |")
extra = []
a, z = runs.get("eager_keep34"), runs.get("eager_keep100")
if a and z:
    extra.append(f"- eager step keep 34% / keep 100%: {a['step_ms'] / z['step_ms']:.3f} (FLOP model "
                 f"{a['flops_per_image']['total'] / z['flops_per_image']['total']:.3f})")
    extra.append(f"- eager step / sum of parts: {a['step_over_parts']:.3f}; MIM teacher / plain timm blocks: "
                 f"{a.get('mim_over_timm', float('nan')):.3f}; {a['config']['dtype']} matmul {a['gemm_tflops']:.1f} TFLOP/s")
st, t32 = runs.get("students2"), runs.get("teachers_fp32")
if st and "students" in st:
    extra.append(f"- two students from one teacher pass / the sum of their single steps: "
                 f"{st['students']['step_over_single_sum']:.3f} (FLOP model {st['students']['flop_model']:.3f})")
if a and t32:
    extra.append(f"- teachers {a['config']['teacher_dtype']} (the default) / fp32: step {a['step_ms'] / t32['step_ms']:.3f}, "
                 f"teacher parameters {a['teacher_param_bytes'] / 2**20:,.0f} / {t32['teacher_param_bytes'] / 2**20:,.0f} MiB")
ct = runs.get("cached_targets")
if ct and "cached" in ct:
    extra.append(f"- step from cached targets / online step: {ct['cached']['step_over_online']:.3f} "
                 f"(FLOP model {ct['cached']['flop_model']:.3f})")
ca, cz = runs.get("compiled_keep34"), runs.get("compiled_keep100")
if ca and cz:
    extra.append(f"- compiled step keep 34% / keep 100%: {ca['step_ms'] / cz['step_ms']:.3f}")
for name in ("data_all_cpus", "data_2_workers"):
    d = runs.get(name)
    for path, r in ((d or {}).get("paths") or {}).items():
        dev_txt = f", device decode {r['device_images_per_s']:,.0f}/s" if "device_images_per_s" in r else ""
        extra.append(f"- {name} {path}: {r['images_per_s']:,.0f} images/s with {d['workers']} workers "
                     f"({r['per_core_images_per_s']:,.0f} per core{dev_txt}; cores for the compiled step: "
                     f"{r.get('cores_needed', float('nan')):.1f})")
ds = runs.get("data_step")
if ds and "data" in ds:
    extra.append(f"- real shards (gpu decode) / synthetic batch, neighbouring steps: "
                 f"{ds['data']['real_over_synthetic']:.3f} ({'waited for data' if ds['data']['waited_for_data'] else 'kept up'})")
e = runs.get("e2e")
if e:
    extra.append(f"- hd distill on shards, SIGTERM + --resume auto: rc {e['rc']}, last step {e['last_step']}, "
                 f"median {e['img_per_s'] or 0:,.0f} images/s")
s = runs.get("syncs_keep34")
if s and "host_syncs" in s:
    extra.append(f"- host syncs per step: {s['host_syncs']['per_step']:.1f} at {s['host_syncs']['where']}")
text = f"Device: {dev}\n\n" + "\n".join(rows) + "\n\n" + "\n".join(extra) + "\n"
(res / "gpu_summary.md").write_text(text)
print(text)
EOF
rm -rf "$TMP"
echo "total $((SECONDS - START)) s; results in $RES/gpu_results.json, $RES/gpu_summary.md, $RES/gpu.log"
