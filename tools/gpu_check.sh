#!/usr/bin/env bash
# The last device call of the GPU kit (`make gpu-kit` prints the plan): install the kit into a fresh
# prefix, then run every GPU check, each under its own time limit, all within CHECK_BUDGET_S (480 s):
#   pytest -m gpu, the three benchmarks at their GPU sizes (router overhead at 64 experts x 16k tokens,
#   elastic inference, the training step in bf16 and FP8 with TE), a few steps of the training entry
#   with the TE spec and FP8 on one GPU, and emoe-elastic-eval of that checkpoint.
# Every figure lands as JSON in $OUT (at most 8 files come back): summary.json (device, versions,
# each step's status and time), router_overhead.json, elastic_inference.json, train_step.json,
# elastic_eval.json, pytest_gpu.xml, gpu_check.log (all output).
#
#   bash tools/gpu_check.sh            # on the GPU machine ($OUT set by the device tool)
#   bash tools/gpu_check.sh --dry-run  # here: install the kit into a fresh prefix of the kit's scratch
#                                      # venv (torch 2.11.0), import everything, collect the gpu tests,
#                                      # check every step's flags; TE may fail only for want of a driver
# Environment: PYTHON (default python3; the scratch venv in --dry-run), KIT_DIRS (folders of wheels
# or wheel parts, default gpu-kit/wheels), KIT_STASH (a folder that earlier calls filled), KIT_PREFIX.
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: tools/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
CHECK_BUDGET_S=480
if [ "$DRY" = 1 ]; then
  PYTHON=${PYTHON:-$REPO/gpu-kit/build/venv/bin/python}
  OUT=${OUT:-$REPO/gpu-kit/dry-run}
  KIT_PREFIX=${KIT_PREFIX:-$REPO/gpu-kit/build/dry-run-site}
else
  PYTHON=${PYTHON:-python3}
  OUT=${OUT:-$REPO/gpu-kit/out}
  KIT_PREFIX=${KIT_PREFIX:-/tmp/emoe-kit-site}
fi
KIT_DIRS=${KIT_DIRS:-gpu-kit/wheels}
KIT_STASH=${KIT_STASH:-}
WORK=$(mktemp -d /tmp/emoe-gpu-check.XXXXXX)
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
STEPS=$WORK/steps.jsonl
: >"$LOG"; : >"$STEPS"
T0=$(date +%s)
say() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# step NAME TIMEOUT CMD...: run (or, in --dry-run, show) one check under its limit; never stops the script.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( CHECK_BUDGET_S - ($(date +%s) - T0) - 5 ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -le 5 ]; then
    say "SKIP $name: the ${CHECK_BUDGET_S} s budget is spent"
    echo "{\"step\": \"$name\", \"status\": \"not run\", \"reason\": \"budget spent\"}" >>"$STEPS"; return
  fi
  if [ "$DRY" = 1 ] && [ "${STEP_RUNS_IN_DRY_RUN:-0}" != 1 ]; then
    say "would run $name (timeout ${limit}s): $*"
    printf '{"step": "%s", "status": "dry-run", "timeout_s": %s}\n' "$name" "$limit" >>"$STEPS"; return
  fi
  say "RUN $name (timeout ${limit}s): $*"
  local t=$(date +%s)
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$? took=$(( $(date +%s) - t )) status=ok
  [ $rc -ne 0 ] && status=failed
  { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && status="timed out"
  say "$status $name: rc=$rc in ${took}s"
  printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s}\n' \
    "$name" "$status" "$rc" "$took" "$limit" >>"$STEPS"
}

# ---- 1. the kit: wheels from KIT_DIRS and KIT_STASH, parts joined, installed into a fresh prefix ----
say "python: $PYTHON; kit: $KIT_DIRS ${KIT_STASH:++ $KIT_STASH}; prefix: $KIT_PREFIX; out: $OUT"
mkdir -p "$WORK/kit"
for dir in $KIT_DIRS $KIT_STASH; do
  [ -d "$dir" ] || { say "kit folder $dir is missing"; continue; }
  cp "$dir"/* "$WORK/kit/" 2>/dev/null
done
for first in "$WORK"/kit/*.part000; do
  [ -e "$first" ] || break
  whole=${first%.part000}
  cat "${whole}".part[0-9][0-9][0-9] >"$whole" && rm -f "${whole}".part[0-9][0-9][0-9]
  say "joined $(basename "$whole") from its parts"
done
ls -l "$WORK/kit" >>"$LOG"
rm -rf "$KIT_PREFIX"
if ! timeout -k 5 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$KIT_PREFIX" "$WORK"/kit/*.whl >>"$LOG" 2>&1; then
  say "FAILED to install the kit (see $LOG)"; INSTALL=failed
else
  INSTALL=ok
fi
rm -rf "$WORK/kit"
export PYTHONPATH=$KIT_PREFIX${PYTHONPATH:+:$PYTHONPATH}
export PATH=$KIT_PREFIX/bin:$PATH
export PYTHONUNBUFFERED=1 TORCHDYNAMO_DISABLE=1 PYTHONWARNINGS=ignore
say "kit install: $INSTALL"

# ---- 2. what is there: device, versions, Transformer Engine (written into summary.json) ----
timeout -k 5 60 "$PYTHON" - "$WORK/environment.json" "$DRY" >>"$LOG" 2>&1 <<'EOF'
import importlib, importlib.metadata as md, json, platform, sys, traceback
out, dry = sys.argv[1], sys.argv[2] == "1"
env = {"python": platform.python_version(), "dry_run": dry}
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
for name in ("torch", "megatron-core", "megatron-emoe", "transformer-engine", "transformer-engine-cu13",
             "transformer-engine-torch", "triton", "transformers", "datasets", "pydantic"):
    env[name] = version(name)
import torch
env["cuda_build"] = torch.version.cuda
env["cuda_available"] = torch.cuda.is_available()
if env["cuda_available"]:
    env["device"] = torch.cuda.get_device_name(0)
    env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
    env["gpus"] = torch.cuda.device_count()
for module in ("megatron.core", "megatron_emoe", "datasets", "transformer_engine.pytorch"):
    try:
        importlib.import_module(module)
        env[f"import {module}"] = "ok"
    except BaseException as error:  # TE's loader may raise anything, SystemExit included
        env[f"import {module}"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
try:
    from megatron.core.extensions.transformer_engine import HAVE_TE
    env["megatron HAVE_TE"] = bool(HAVE_TE)
except BaseException as error:
    env["megatron HAVE_TE"] = f"{type(error).__name__}: {error}"
if env["import transformer_engine.pytorch"] == "ok":
    import transformer_engine.pytorch as te
    try:  # the torch binding calls into the pruned core library
        import transformer_engine_torch as tex
        env["te cudnn (runtime)"] = tex.get_cudnn_version()
    except BaseException as error:
        env["te cudnn (runtime)"] = f"{type(error).__name__}: {error}"
    if env["cuda_available"]:
        for check in ("check_fp8_support", "check_mxfp8_support", "check_fp8_block_scaling_support"):
            for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
                try:
                    fn = getattr(importlib.import_module(module), check, None)
                except ImportError:
                    fn = None
                if fn is not None:
                    env[check] = list(map(str, fn()))
                    break
    else:  # here the one thing missing must be the GPU and its driver
        try:
            te.Linear(16, 16)
            env["te without a GPU"] = "built a te.Linear?!"
        except BaseException as error:
            env["te without a GPU"] = f"{type(error).__name__}: {error}"
core = all(env[f"import {m}"] == "ok" for m in ("megatron.core", "megatron_emoe", "datasets",
                                                   "transformer_engine.pytorch"))
core = core and env["megatron HAVE_TE"] is True and isinstance(env.get("te cudnn (runtime)"), int)
if not env["cuda_available"]:
    core = core and "CUDA" in env.get("te without a GPU", "")
env["verdict"] = "ok" if core else "kit incomplete: see the import lines"
json.dump(env, open(out, "w"), indent=2)
print(json.dumps(env, indent=2))
EOF
TE_OK=$("$PYTHON" -c "import json,sys; e=json.load(open(sys.argv[1])); print(int(e.get('import transformer_engine.pytorch')=='ok' and bool(e.get('megatron HAVE_TE') is True)))" "$WORK/environment.json" 2>/dev/null || echo 0)
say "Transformer Engine usable: $TE_OK"
VERDICT=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1])).get('verdict', 'no environment probe'))" "$WORK/environment.json" 2>/dev/null || echo "no environment probe")
say "kit verdict: $VERDICT"

# ---- 3. the checks, each under its limit ----
[ "$DRY" = 1 ] && STEP_RUNS_IN_DRY_RUN=1 step "pytest-collect" 60 "$PYTHON" -m pytest -m gpu tests/test_gpu_path.py --collect-only -q -p no:cacheprovider
step "pytest-gpu" 110 "$PYTHON" -m pytest -m gpu tests/test_gpu_path.py -v -rs -p no:cacheprovider \
  --timeout 100 --junitxml "$OUT/pytest_gpu.xml"
step "router-overhead" 50 "$PYTHON" -m benchmarks.router_overhead --experts 64 --tokens 16384 --output "$OUT"
step "elastic-inference" 50 "$PYTHON" -m benchmarks.elastic_inference --output "$OUT"
if [ "$TE_OK" = 1 ] || [ "$DRY" = 1 ]; then
  step "train-step-bf16-fp8" 70 "$PYTHON" -m benchmarks.train_step --te --precisions bf16,fp8 --output "$OUT"
else
  say "no usable Transformer Engine: the training step runs in bf16 without TE, FP8 is not run"
  step "train-step-bf16" 70 "$PYTHON" -m benchmarks.train_step --precisions bf16 --output "$OUT"
fi
DATA=$WORK/data
STEP_RUNS_IN_DRY_RUN=$DRY step "default-data" 20 "$PYTHON" -m megatron_emoe.cli.build_default_data \
  --output-dir "$DATA" --corpus-bytes 300000 --vocab-size 512 --no-progress
DATA_FLAGS=(--train-data-path "$DATA/pretrain_train_text_document" --valid-data-path "$DATA/pretrain_valid_text_document"
            --tokenizer-model "$DATA/tokenizer")
if [ -f "$DATA/manifest.json" ]; then
  # the prefixes as the builder names them
  mapfile -t DATA_FLAGS < <("$PYTHON" -c "
import sys; from megatron_emoe.data.default_data import data_paths; p = data_paths(sys.argv[1])
print('\n'.join(['--train-data-path', p['pretrain_train'], '--valid-data-path', p['pretrain_valid'], '--tokenizer-model', p['tokenizer_model']]))" "$DATA")
fi
TE_FLAGS=(--transformer-impl transformer_engine --moe-grouped-gemm --bf16 --fp8-format hybrid --fp8-recipe delayed
          --moe-router-padding-for-quantization)
[ "$TE_OK" = 1 ] || [ "$DRY" = 1 ] || TE_FLAGS=(--bf16)
PRETRAIN_ARGS=(--config examples/configs/tiny.yaml --expert-model-parallel-size 1 "${DATA_FLAGS[@]}" "${TE_FLAGS[@]}"
               --moe-router-mode emoe --emoe-k-ideal 4 --train-iters 8 --eval-interval 8 --eval-iters 2
               --save "$WORK/ckpt" --save-interval 1000 --tensorboard-dir "$WORK/tb")
# --dry-run: Megatron's parser takes every flag of the TE + FP8 run (parsed only: no CUDA here)
[ "$DRY" = 1 ] && STEP_RUNS_IN_DRY_RUN=1 step "pretrain-flags" 60 "$PYTHON" -c "
import sys
from megatron_emoe.runtime.arguments import parse_training_args
a = parse_training_args(sys.argv[1:])
print('parsed:', a.transformer_impl, a.fp8, a.fp8_recipe, a.bf16, a.moe_grouped_gemm, a.moe_router_padding_for_quantization)
" "${PRETRAIN_ARGS[@]}"
# one GPU, launched as the project launches (torchrun, standalone rendezvous): NCCL needs its env://
step "pretrain-te-fp8" 85 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node=1 \
  --module megatron_emoe.cli.pretrain "${PRETRAIN_ARGS[@]}"
step "elastic-eval" 50 "$PYTHON" -m megatron_emoe.cli.elastic_eval --load "$WORK/ckpt" --output "$WORK/eval" \
  --budgets 1 2 3 4
[ -f "$WORK/eval/elastic_eval.json" ] && cp "$WORK/eval/elastic_eval.json" "$OUT/"

# ---- 4. summary.json: environment, steps, and the figures' files ----
"$PYTHON" - "$WORK/environment.json" "$STEPS" "$OUT" "$INSTALL" "$(( $(date +%s) - T0 ))" <<'EOF' | tee -a "$LOG"
import json, os, sys, time
env_file, steps_file, out, install, seconds = sys.argv[1:]
env = json.load(open(env_file)) if os.path.exists(env_file) else {}
steps = [json.loads(line) for line in open(steps_file) if line.strip()]
summary = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": env.get("device"),
           "transformer_engine": env.get("transformer-engine-torch") or env.get("transformer-engine"),
           "kit_install": install, "seconds": int(seconds), "environment": env, "steps": steps,
           "files": sorted(f for f in os.listdir(out) if f != "summary.json")}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("device", "transformer_engine", "kit_install", "seconds")}))
for s in steps:
    print(f"  {s['step']:22s} {s['status']:10s} {s.get('seconds', '')}")
EOF
rm -rf "$WORK"
say "done in $(( $(date +%s) - T0 )) s; results in $OUT"
[ "$INSTALL" = ok ] && [ "$VERDICT" = ok ] || exit 1
if [ "$DRY" = 1 ]; then  # every step that runs in a dry run must have passed
  grep -q '"status": "failed"\|"status": "timed out"' "$OUT/summary.json" && exit 1
fi
exit 0
