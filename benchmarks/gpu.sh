#!/usr/bin/env bash
# One GPU benchmark run of calm_jax against the reference, written to one results file (< 8 min on an H100/H200).
#
#   bash benchmarks/gpu.sh [--out=benchmarks/RESULTS_gpu_run.md]           # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu.sh --dry-run [--out=/tmp/gpu_dry.md]              # on a CPU: shrunk sizes, no CUDA install
#
# Steps:
#   1. jax[cuda12] (the project's jax version) into .venv-gpu beside the project, on top of the project's
#      venv (--system-site-packages: flax, optax, ... come from there); torch with CUDA into .venv-ref-gpu
#      on top of the reference's venv when its torch has no CUDA.  Skipped with --dry-run; a failed install
#      (an offline machine) is reported in the results and the run goes on with what is there.
#   2. Train steps, bf16 (benchmarks/compare.py, the two programs alternating): the autoencoder and a
#      CALM-M-sized step (size gpu_m), a Transformer-S-sized step (gpu_s), V = 128,257, 8 x 2048 tokens;
#      MFU against the GPU's dense bf16 peak (CALM_BENCH_PEAK_FLOPS, from the GPU's name); the reference's
#      steps on CUDA beside them (CALM_BENCH_DEVICE=cuda).
#   3. Generation (benchmarks/generation.py): T = 1 and T = 1/2 with N = 200, batch 1 and 32, a CALM-M-sized
#      backbone, the reference on CUDA.
#
# Environment: CALM_PYTHON (the project's python, default .venv/bin/python or /work/main/.venv/bin/python),
# CALM_REFERENCE_DIR (default /work/ref), CALM_REFERENCE_PYTHON (default /work/refvenv/bin/python).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
OUT="$ROOT/benchmarks/RESULTS_gpu_run.md"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --out=*) OUT="${arg#--out=}" ;;
    -h|--help) sed -n 2,22p "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

PY="${CALM_PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in "$ROOT/.venv/bin/python" /work/main/.venv/bin/python "$(command -v python3)"; do
    [[ -x "$cand" ]] && { PY="$cand"; break; }
  done
fi
export CALM_REFERENCE_DIR="${CALM_REFERENCE_DIR:-/work/ref}"
REF_PY="${CALM_REFERENCE_PYTHON:-/work/refvenv/bin/python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)

mkdir -p "$(dirname "$OUT")"
{
  echo "# calm_jax GPU benchmark run ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Command: \`bash benchmarks/gpu.sh $*\`; commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo
} > "$OUT"
note() { echo "$*" | tee -a "$OUT"; }

if [[ $DRY -eq 1 ]]; then
  note "**Dry run** (--dry-run): sizes dry_m / dry_s, short generation, no CUDA install, on $(uname -m) CPU."
  SIZE_M=dry_m; SIZE_S=dry_s; ITERS=2; ROUNDS=1; DTYPE=bfloat16
  GEN_ARGS=(--vocab=4096 --hidden=64 --layers=2 --heads=4 --max_new_tokens=8 --repeats=1)
  export CALM_BENCH_DEVICE=cpu
  export JAX_PLATFORMS=cpu
else
  SIZE_M=gpu_m; SIZE_S=gpu_s; ITERS=5; ROUNDS=2; DTYPE=bfloat16
  GEN_ARGS=(--vocab=128257 --hidden=1024 --layers=16 --heads=16 --max_new_tokens=64 --repeats=2)
  export CALM_BENCH_DEVICE=cuda
  GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
  note "GPU: ${GPU_NAME:-none found by nvidia-smi}"
  # Dense bf16 peaks (vendor datasheets, no sparsity).
  case "$GPU_NAME" in
    *H200*|*H100*SXM*|*H100\ 80GB\ HBM3*) PEAK=989e12 ;;
    *H100*) PEAK=756e12 ;;
    *A100*) PEAK=312e12 ;;
    *L40S*) PEAK=362e12 ;;
    *L4*) PEAK=121e12 ;;
    *A10*) PEAK=125e12 ;;
    *) PEAK="" ;;
  esac
  if [[ -n "$PEAK" ]]; then
    export CALM_BENCH_PEAK_FLOPS="$PEAK"
    note "MFU denominator: $PEAK FLOP/s (dense bf16 peak of the $GPU_NAME)"
  else
    note "MFU denominator: the matmul peak measured in each process (GPU not in the table)"
  fi
  # 1. jax[cuda12] beside the project.
  JAXVER="$("$PY" -c 'import jax; print(jax.__version__)')"
  if [[ ! -x "$ROOT/.venv-gpu/bin/python" ]]; then
    "$PY" -m venv --system-site-packages "$ROOT/.venv-gpu"
  fi
  if timeout 240 "$ROOT/.venv-gpu/bin/pip" install -q "jax[cuda12]==$JAXVER" >>"$OUT.install.log" 2>&1; then
    note "Installed jax[cuda12]==$JAXVER into .venv-gpu"
  else
    note "jax[cuda12]==$JAXVER install FAILED (see $OUT.install.log); using what .venv-gpu has"
  fi
  PY="$ROOT/.venv-gpu/bin/python"
  note "JAX devices: $("$PY" -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
  if ! "$REF_PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    REFDIR="$(dirname "$(dirname "$REF_PY")")"
    [[ -x "$ROOT/.venv-ref-gpu/bin/python" ]] || \
      "$("$REF_PY" -c 'import sys; print(sys.executable)')" -m venv --system-site-packages "$ROOT/.venv-ref-gpu"
    if timeout 240 "$ROOT/.venv-ref-gpu/bin/pip" install -q torch >>"$OUT.install.log" 2>&1; then
      note "Installed CUDA torch into .venv-ref-gpu (over $REFDIR)"
    else
      note "CUDA torch install FAILED (see $OUT.install.log)"
    fi
    REF_PY="$ROOT/.venv-ref-gpu/bin/python"
  fi
  note "Reference torch: $("$REF_PY" -c 'import torch; print(torch.__version__, "cuda", torch.cuda.is_available())' 2>&1 | tail -1)"
fi
export CALM_REFERENCE_PYTHON="$REF_PY"

# 2. Train steps.
note ""
note "## Train steps ($DTYPE)"
note ""
for spec in "$SIZE_M:autoencoder,energy" "$SIZE_S:transformer"; do
  size="${spec%%:*}"; models="${spec#*:}"
  timeout 300 "$PY" "$ROOT/benchmarks/compare.py" --sizes="$size" --models="$models" --dtype="$DTYPE" \
      --rounds="$ROUNDS" --iters="$ITERS" --ref_python="$REF_PY" 2>>"$OUT.log" | tee -a "$OUT"
  rc=${PIPESTATUS[0]}
  [[ $rc -ne 0 ]] && note "compare.py --sizes=$size exited with $rc (stderr in $OUT.log)"
  note ""
done

# 3. Generation.
note "## Generation (T = 1 and 1/2, N = 200, batch 1 and 32)"
note ""
GEN_DEV=cuda; [[ $DRY -eq 1 ]] && GEN_DEV=cpu
timeout 240 "$PY" "$ROOT/benchmarks/generation.py" "${GEN_ARGS[@]}" --batches=1,32 \
    --reference_device="$GEN_DEV" 2>>"$OUT.log" | tee -a "$OUT"
rc=${PIPESTATUS[0]}
[[ $rc -ne 0 ]] && note "generation.py exited with $rc (stderr in $OUT.log)"

note ""
note "Total wall time: $(( $(date +%s) - START )) s"
echo "results: $OUT"
