#!/usr/bin/env bash
# One-command check of flaxllm on one rented NVIDIA GPU (H100 / H200), in under 8 minutes.
#
# Run from anywhere (it changes to the repository root), with the repository's venv:
#
#   bash bench/gpu_check.sh              # on the GPU machine: writes to bench/results/
#   bash bench/gpu_check.sh --dry-run    # anywhere (CPU): tiny shapes, writes to a temp dir
#   DRY_RUN=1 bash bench/gpu_check.sh    # the same
#
# Set-up on a fresh GPU machine (the venv's default jaxlib is CPU-only):
#   make .venv/.installed-dev
#   .venv/bin/pip install "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
# (or pass --install-cuda to have this script run that pip command first; needs the network).
#
# Parts, in this order, each in its own process under its own `timeout`, so one hanging part
# cannot eat the budget; a failed part is recorded and the next one runs; the exit status is
# non-zero when any part failed:
#   1. preflight   jax backend and devices; whether flaxllm's GPU kernels would be interpreted
#                  (`flaxllm.kernels.options.resolve_interpret(None, 'gpu')`, False on a GPU);
#                  one compiled Pallas flash attention (its HLO must call Triton) and one cuDNN
#                  attention, each checked against the XLA reference. Stops the check when the
#                  backend is not a GPU (except in --dry-run).
#   2. kernels     pytest tests/test_kernels.py -q -x: on a GPU the 'gpu' kernel family runs
#                  compiled (Triton), the 'tpu' family in the Pallas interpreter.
#                  --dry-run: collection plus a quick subset.
#   3. train MFU   bench/train_mfu.py: the trainer's train step of a 0.95B LLaMA, batch 8 x
#                  2048, bf16; MFU against the datasheet and the measured bf16 peak.
#                  --dry-run: --tiny (2 steps of a 0.1M-parameter model).
#   4. attention   bench/attention.py (Pallas flash vs cuDNN vs XLA, seq 1k..16k), head_dim 128
#                  first, then head_dim 64 with the time left; merged into one result file.
#                  --dry-run: --quick.
#
# Writes (OUT = bench/results, or a new temp dir with --dry-run; --out-dir=DIR to choose):
#   OUT/gpu_check_<device>.md               summary: device, jax, each part's status and time
#   OUT/train_mfu_<device>.{json,md}        from bench/train_mfu.py
#   OUT/attention_<device>.{json,md}        from bench/attention.py (both head dims merged)
#   OUT/gpu_check_<device>_logs/            every part's full output
# <device> is the jax device_kind in lower case with '_' for other characters (as
# bench/attention.py names its files), e.g. nvidia_h100_80gb_hbm3.
#
# Time budget (seconds; environment variables override): GPU_CHECK_BUDGET_S=460 in all,
# PREFLIGHT_TIMEOUT_S=45, KERNEL_TESTS_TIMEOUT_S=150, MFU_TIMEOUT_S=135, ATTN_TIMEOUT_S=110
# (head_dim 128; head_dim 64 gets what is left of the budget, skipped under 30 s), so the
# worst case is 460 s plus a few seconds of nvidia-smi and summary. --dry-run: budget 300 s.
# Other knobs: KERNEL_TEST_ARGS (default "-q -x"), ATTN_REPS=5, ATTN_WARMUP=1,
# ATTN_IMPLS=pallas,cudnn,xla (bench/attention.py's 'blocked' left out for time), MFU_ARGS (extra
# arguments of bench/train_mfu.py, e.g. "--batch 4"), XLA_PYTHON_CLIENT_MEM_FRACTION (0.92
# for the MFU part), PYTHON (default .venv/bin/python).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

DRY_RUN=${DRY_RUN:-0}
INSTALL_CUDA=0
OUT_DIR=''
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --install-cuda) INSTALL_CUDA=1 ;;
    --out-dir=*) OUT_DIR=${arg#--out-dir=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done
[ "$DRY_RUN" = 0 ] || DRY_RUN=1

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$ROOT/.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "gpu_check: no python at $PY; run 'make .venv/.installed-dev' first (or set PYTHON)." >&2
  exit 2
fi

START=$(date +%s)
STAMP=$(mktemp "${TMPDIR:-/tmp}/gpu_check_stamp.XXXXXX")   # dry-run: nothing newer in results
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_work.XXXXXX")  # logs until the device is known
if [ "$DRY_RUN" = 1 ]; then
  OUT=${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_dry.XXXXXX")}
  BUDGET=${GPU_CHECK_BUDGET_S:-300}
else
  OUT=${OUT_DIR:-$ROOT/bench/results}
  BUDGET=${GPU_CHECK_BUDGET_S:-460}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T_PRE=${PREFLIGHT_TIMEOUT_S:-45}
T_KERNELS=${KERNEL_TESTS_TIMEOUT_S:-150}
T_MFU=${MFU_TIMEOUT_S:-135}
T_ATTN=${ATTN_TIMEOUT_S:-110}
PARTS=$WORK/parts.tsv   # name, status, exit code, seconds, timeout, one-line result
: > "$PARTS"
FAILED=0

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }
elapsed() { echo $(( $(date +%s) - START )); }

# run_part NAME TIMEOUT LOG CMD...: runs CMD under `timeout`, its output to LOG and (indented)
# to the terminal; sets PART_RC, PART_SECS and PART_STATUS (ok | FAILED | TIMEOUT).
run_part() {
  local name=$1 limit=$2 log=$3
  shift 3
  local shown="$*"
  [ "${shown%%$'\n'*}" = "$shown" ] || shown="${shown%%$'\n'*} ..."
  say "$name: $shown (timeout ${limit}s)"
  local t0
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$log" | sed -u 's/^/    /'
  PART_RC=${PIPESTATUS[0]}
  PART_SECS=$(( $(date +%s) - t0 ))
  case $PART_RC in
    0) PART_STATUS=ok ;;
    124|137) PART_STATUS=TIMEOUT ;;
    *) PART_STATUS=FAILED ;;
  esac
  say "$name: $PART_STATUS (exit $PART_RC) after ${PART_SECS}s"
}

# record NAME STATUS RC SECS TIMEOUT RESULT
record() {
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" >> "$PARTS"
  [ "$2" = ok ] || [ "$2" = skipped ] || FAILED=1
}

# ------------------------------------------------------------------------------ 0. set-up
if [ "$INSTALL_CUDA" = 1 ] && [ "$DRY_RUN" = 0 ]; then
  JAXVER=$("$PY" -c 'import jax; print(jax.__version__)')
  run_part install-cuda 600 "$WORK/install_cuda.log" \
    "$PY" -m pip install -q "jax[cuda12]==$JAXVER"
  record install-cuda "$PART_STATUS" "$PART_RC" "$PART_SECS" 600 "pip install jax[cuda12]==$JAXVER"
fi

if command -v nvidia-smi > /dev/null; then
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
    > "$WORK/nvidia_smi.csv" 2>&1 || echo "(nvidia-smi failed)" >> "$WORK/nvidia_smi.csv"
else
  echo "(no nvidia-smi on this machine)" > "$WORK/nvidia_smi.csv"
fi
cat "$WORK/nvidia_smi.csv"

# ------------------------------------------------------------------------------ 1. preflight
# bench/gpu_check.py preflight: key=value lines to $WORK/preflight.env, read here with pf.
if [ "$DRY_RUN" = 1 ]; then PRE_MODE=(--dry-run); else PRE_MODE=(); fi
run_part preflight "$T_PRE" "$WORK/preflight.log" \
  "$PY" bench/gpu_check.py preflight "$WORK/preflight.env" ${PRE_MODE[@]+"${PRE_MODE[@]}"}
pf() { grep -m1 "^$1=" "$WORK/preflight.env" 2>/dev/null | cut -d= -f2-; }
BACKEND=$(pf backend)
SLUG=$(pf slug)
SLUG=${SLUG:-unknown}
INTERPRETED=$(pf gpu_kernels_interpreted)
PRE_NOTE="backend ${BACKEND:-?}, $(pf devices), GPU kernels interpreted: ${INTERPRETED:-?}"
if [ -n "$(pf check_shape)" ]; then
  PRE_NOTE="$PRE_NOTE; compiled flash calls Triton: $(pf flash_triton_in_hlo)$(pf flash_error),"
  PRE_NOTE="$PRE_NOTE max err $(pf flash_max_abs_err); cuDNN max err $(pf cudnn_max_abs_err)$(pf cudnn_error)"
fi
if [ "$BACKEND" = gpu ] && [ "$PART_STATUS" = ok ] && { [ "$(pf flash_triton_in_hlo)" != True ] \
    || [ "$INTERPRETED" != False ] || [ -n "$(pf flash_error)$(pf cudnn_error)" ]; }; then
  PART_STATUS=FAILED
fi
STOP=''
if [ "$DRY_RUN" = 0 ] && [ "$BACKEND" != gpu ]; then
  PART_STATUS=FAILED
  STOP="jax's default backend is '${BACKEND:-unknown}', not 'gpu': install the CUDA jaxlib (.venv/bin/pip install \"jax[cuda12]==$(pf jax)\", or rerun with --install-cuda) and run again"
  PRE_NOTE="$PRE_NOTE. STOPPED: $STOP"
fi
record preflight "$PART_STATUS" "$PART_RC" "$PART_SECS" "$T_PRE" "$PRE_NOTE"

LOGS=$OUT/gpu_check_${SLUG}_logs
MFU_OUT=$OUT/train_mfu_$SLUG
ATTN_OUT=$OUT/attention_$SLUG

if [ -z "$STOP" ]; then
  # ---------------------------------------------------------------------------- 2. kernels
  if [ "$DRY_RUN" = 1 ]; then
    run_part kernel-tests-collect "$T_KERNELS" "$WORK/kernel_tests_collect.log" \
      "$PY" -m pytest tests/test_kernels.py --collect-only -q -p no:cacheprovider
    COLLECTED=$(grep -Eo '[0-9]+ tests? collected' "$WORK/kernel_tests_collect.log" | tail -1)
    record kernel-tests-collect "$PART_STATUS" "$PART_RC" "$PART_SECS" "$T_KERNELS" \
      "${COLLECTED:-no collection line}"
    # shellcheck disable=SC2086
    run_part kernel-tests "$T_KERNELS" "$WORK/kernel_tests.log" \
      "$PY" -m pytest tests/test_kernels.py ${KERNEL_TEST_ARGS:--q -x} -rfEs -p no:cacheprovider \
      --timeout 120 -k 'bad_input or block_sizes_must or dispatcher or default_block_sizes'
  else
    # shellcheck disable=SC2086
    run_part kernel-tests "$T_KERNELS" "$WORK/kernel_tests.log" \
      "$PY" -m pytest tests/test_kernels.py ${KERNEL_TEST_ARGS:--q -x} -rfEs -p no:cacheprovider \
      --timeout 120
  fi
  RESULT=$(grep -E '[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran' \
           "$WORK/kernel_tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
  if [ "$PART_STATUS" = TIMEOUT ]; then   # pytest -q's last progress line, e.g. '....F [ 60%]'
    RESULT="timed out after ${PART_SECS}s at: $(grep -v '^ *$' "$WORK/kernel_tests.log" | tail -1 | cut -c1-120)"
  fi
  record kernel-tests "$PART_STATUS" "$PART_RC" "$PART_SECS" "$T_KERNELS" \
    "${RESULT:-no pytest result line} (GPU kernels interpreted: ${INTERPRETED:-?})"

  # ---------------------------------------------------------------------------- 3. train MFU
  if [ "$DRY_RUN" = 1 ]; then MFU_MODE=(--tiny); else MFU_MODE=(); fi
  # shellcheck disable=SC2086
  run_part train-mfu "$T_MFU" "$WORK/train_mfu.log" \
    env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}" \
    "$PY" bench/train_mfu.py ${MFU_MODE[@]+"${MFU_MODE[@]}"} ${MFU_ARGS:-} --out "$MFU_OUT"
  MFU_NOTE=''
  if [ -f "$MFU_OUT.json" ] && [ "$PART_STATUS" = ok ]; then
    MFU_NOTE=$("$PY" bench/gpu_check.py mfu-note "$MFU_OUT.json")
  fi
  record train-mfu "$PART_STATUS" "$PART_RC" "$PART_SECS" "$T_MFU" "${MFU_NOTE:-see the log}"

  # ---------------------------------------------------------------------------- 4. attention
  if [ "$DRY_RUN" = 1 ]; then
    ATTN_MODE=(--quick)
  else
    ATTN_MODE=(--reps "${ATTN_REPS:-5}" --warmup "${ATTN_WARMUP:-1}")
  fi
  ATTN_MODE+=(--impls "${ATTN_IMPLS:-pallas,cudnn,xla}")
  ATTN_PARTS=()
  for d in 128 64; do
    if [ "$d" = 128 ]; then
      limit=$T_ATTN
    else
      limit=$(( BUDGET - $(elapsed) ))
      if [ "$limit" -lt 30 ]; then
        record "attention-d$d" skipped - 0 - "$limit s of the ${BUDGET} s budget left (under 30 s)"
        continue
      fi
    fi
    run_part "attention-d$d" "$limit" "$WORK/attention_d$d.log" \
      "$PY" bench/attention.py "${ATTN_MODE[@]}" --head-dims "$d" --out "$WORK/attention_d$d"
    ATTN_PARTS+=("$WORK/attention_d$d")
    NOTE="$(grep -c '^d=' "$WORK/attention_d$d.log") rows printed"
    if [ -f "$WORK/attention_d$d.json" ]; then
      NOTE="$NOTE; $(grep -m1 '^check vs xla' "$WORK/attention_d$d.log" | cut -c1-200)"
    else
      NOTE="$NOTE, no result file: the printed rows are merged into the result"
    fi
    record "attention-d$d" "$PART_STATUS" "$PART_RC" "$PART_SECS" "$limit" "$NOTE"
  done
  # One result file for both head dims (bench/attention.py's own markdown); a run that was
  # stopped contributes the rows it printed.
  if [ ${#ATTN_PARTS[@]} -gt 0 ]; then
    timeout 60 "$PY" bench/gpu_check.py merge-attention "$ATTN_OUT" "${ATTN_PARTS[@]}" \
      || record attention-merge FAILED $? 0 60 "no attention result could be written"
  fi
fi

# ------------------------------------------------------------------------------ 5. summary
mkdir -p "$LOGS"
cp "$WORK"/*.log "$WORK"/nvidia_smi.csv "$LOGS"/ 2>/dev/null
cp "$WORK"/preflight.env "$LOGS"/ 2>/dev/null
if [ "$DRY_RUN" = 1 ]; then
  CHANGED=$(find "$ROOT/bench/results" -newer "$STAMP" -type f 2>/dev/null | head -5)
  if [ -n "$CHANGED" ]; then
    record dry-run-isolation FAILED 1 0 - "dry-run wrote into bench/results: $CHANGED"
  fi
fi
TOTAL=$(elapsed)
SUMMARY=$OUT/gpu_check_$SLUG.md
SUMMARY_OPTS=()
[ "$DRY_RUN" = 1 ] && SUMMARY_OPTS+=(--dry-run)
[ "$FAILED" = 0 ] || SUMMARY_OPTS+=(--failed)
"$PY" bench/gpu_check.py summary "$SUMMARY" --parts "$PARTS" --env "$WORK/preflight.env" \
  --nvidia-smi "$WORK/nvidia_smi.csv" --logs "$LOGS" --mfu "$MFU_OUT" --attention "$ATTN_OUT" \
  --command "bash bench/gpu_check.sh${*:+ $*}" --total "$TOTAL" --budget "$BUDGET" \
  ${SUMMARY_OPTS[@]+"${SUMMARY_OPTS[@]}"} || FAILED=1
[ -f "$SUMMARY" ] || FAILED=1
rm -rf "$WORK" "$STAMP"
echo
cat "$SUMMARY" 2>/dev/null
say "summary: $SUMMARY"
[ "$FAILED" = 0 ] || exit 1
exit 0
