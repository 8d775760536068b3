#!/usr/bin/env bash
# The Alpaca experiment end to end (experiments/alpaca/README.md), each step's wall time in
# runs/alpaca/times.tsv. A step recorded there is skipped, so running it again after a stop
# continues with the first step not done (and a training run resumes from its checkpoint).
#
#     bash experiments/alpaca/run.sh            # from the repository root, after `make train`
#
# FLAXLLM=... to use another flaxllm command, PORT=... for the teacher's server (default 8765).
set -euo pipefail
cd "$(dirname "$0")/../.."
FLAXLLM=${FLAXLLM:-.venv/bin/flaxllm}
PYTHON=${PYTHON:-.venv/bin/python}
PORT=${PORT:-8765}
OUT=runs/alpaca
mkdir -p "$OUT"
export WANDB_MODE=disabled

done_before() {   # done_before NAME: the step NAME is recorded in times.tsv
  grep -q "^$1	" "$OUT/times.tsv" 2>/dev/null
}

timed() {   # timed NAME COMMAND...: runs it and appends "NAME<TAB>seconds" to times.tsv
  local name=$1 start
  shift
  if done_before "$name"; then
    echo "$name: done (runs/alpaca/times.tsv)"
    return
  fi
  start=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$name" "$(($(date +%s) - start))" >> "$OUT/times.tsv"
}

test -f runs/default/tokenizer.model || { echo "run 'make train' first (the base and its tokenizer)"; exit 1; }
timed data "$PYTHON" experiments/alpaca/make_data.py --out-dir "$OUT"
"$PYTHON" experiments/sft_lora/make_data.py --out runs/sft_lora/data.jsonl   # the hand-made set
timed teacher "$FLAXLLM" train --config=experiments/alpaca/teacher.py --workdir="$OUT/teacher"

# The teacher behind the OpenAI API; self-instruct asks it for tasks.
if ! done_before self_instruct; then
  "$FLAXLLM" serve --model="$OUT/teacher" --model-name=teacher --port="$PORT" --slots=8 \
      > "$OUT/serve.log" 2>&1 &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
    kill -0 $SERVER || { cat "$OUT/serve.log"; exit 1; }
    sleep 1
  done
  timed self_instruct "$FLAXLLM" self-instruct --endpoint="http://127.0.0.1:$PORT/v1" \
      --model=teacher --seed-tasks=experiments/alpaca/seed_tasks.jsonl --num=2000 \
      --num-tasks=8 --prompt-tasks=3 --concurrency=8 --out="$OUT/data.jsonl"
  kill $SERVER
  wait $SERVER 2>/dev/null || true
fi

# The students: the `make train` model with LoRA (experiments/sft_lora's recipe), on the
# teacher's data and on the hand-made set, the same steps.
timed student "$FLAXLLM" train --workdir="$OUT/student" \
    --config=experiments/sft_lora/config.py:method=lora,data=$OUT/data.jsonl,steps=600
timed student_handmade "$FLAXLLM" train --workdir="$OUT/student_handmade" \
    --config=experiments/sft_lora/config.py:method=lora,data=runs/sft_lora/data.jsonl,steps=600

for model in runs/default "$OUT/student" "$OUT/student_handmade"; do
  name=$(basename "$model")
  timed "eval_$name" "$FLAXLLM" eval --workdir="$model" --tasks=alpaca_students \
      --include-path=experiments/alpaca/eval_tasks --output="$OUT/eval_$name.json"
done

timed gguf "$FLAXLLM" convert --from="$OUT/student" --to-gguf="$OUT/student-q8_0.gguf" \
    --type=q8_0 --overwrite
timed llama_cpp "$PYTHON" experiments/alpaca/ask_llama_cpp.py --gguf="$OUT/student-q8_0.gguf" \
    --model="$OUT/student" --out="$OUT/llama_cpp.json"
"$PYTHON" experiments/alpaca/report.py --run-dir="$OUT"
