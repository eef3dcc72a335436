#!/bin/bash
# The whole run in one command, as nanochat's speedrun.sh: tokenizer -> base pretraining -> midtraining -> SFT
# -> RL -> evaluation, each stage from the last one's checkpoint, each with its own config (config/speedrun_*),
# ending in OUT/report.md (report.py). The CPU run where no GPU is visible (tiny models, local text and the
# built-in tasks), else the GPU run (nanochat's d20 on FineWeb-Edu, DDP under torchrun on every GPU).
#
#   bash speedrun.sh                       # everything, into out-speedrun/
#   OUT=out-mine bash speedrun.sh          # another output folder
#   bash speedrun.sh --stage=mid           # one stage again, alone (or STAGE=mid); the later ones keep theirs
#   CORE_DIR=~/eval_bundle bash speedrun.sh   # CORE of base and mid on DCLM's bundle (the GPU run downloads it)
#   SIZE=cpu|gpu  SMOKE=1                  # force a size; a few iterations a stage (checks the pipeline)
#
# A finished stage leaves OUT/stages/<stage>.json (command, wall time); starting again skips it, so a run
# killed in the middle resumes at the stage it was in (that stage starts over). Logs: OUT/logs/<stage>.log.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${OUT:-out-speedrun}
STAGE=${STAGE:-}
SMOKE=${SMOKE:-0}
PY=${PYTHON:-python}
STAGES="tok base mid sft rl eval"
for arg in "$@"; do
  case $arg in
    --stage=*) STAGE=${arg#--stage=} ;;
    *) echo "error: unknown argument '$arg' (speedrun.sh takes --stage=<one of: $STAGES>)" >&2; exit 1 ;;
  esac
done
if [ -n "$STAGE" ] && [[ " $STAGES " != *" $STAGE "* ]]; then
  echo "error: the stage must be one of: $STAGES (not '$STAGE')" >&2; exit 1
fi
if [ -z "${SIZE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then SIZE=gpu; else SIZE=cpu; fi
fi
case $SIZE in cpu|gpu) ;; *) echo "error: SIZE must be cpu or gpu, not '$SIZE'" >&2; exit 1 ;; esac
mkdir -p "$OUT/stages" "$OUT/logs" "$OUT/eval"
OUT=$(cd "$OUT" && pwd)
cd "$OUT"  # every stage runs here: data/<name>/ and each stage's out_dir are OUT's

if [ "$SIZE" = gpu ]; then
  NGPU=$(nvidia-smi -L | grep -c '^GPU')
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  TRAIN="torchrun --standalone --nproc_per_node=$NGPU"
  # FineWeb-Edu's 10B-token sample (or BASE_TEXT: your text) in GPT-2's BPE; the chat stages append the chat
  # tokens (the model's 50304 rows have room)
  TOK_CMD="$PY $REPO/data/openwebtext/prepare.py --dataset_name=parquet --num_proc=16 --out_dir=data/base \
--data_files='hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet'"
  [ -n "${BASE_TEXT:-}" ] && TOK_CMD="$PY $REPO/data/custom/prepare.py --input=$BASE_TEXT --tokenizer=gpt2 --out_dir=data/base"
  MID_MIX=${MID_MIX:-smoltalk,mmlu,gsm8k,arith*0.25,products*0.25}
  SFT_MIX=${SFT_MIX:-smoltalk*0.1,arc_easy,arc_challenge,gsm8k,arith*0.05,products*0.05}
  RL_MIX=${RL_MIX:-gsm8k}
  CHAT_N=${CHAT_N:-40000}
  CHAT_TASKS=${CHAT_TASKS-arc_easy,arc_challenge,mmlu,gsm8k,humaneval}  # nanochat's ChatCORE (less SpellingBee)
  EVAL_LIMIT=${EVAL_LIMIT:-0}
  CORE_DIR=${CORE_DIR:-}  # '': chat_eval.py downloads the bundle once
  RUN_CORE=1
else
  TRAIN="$PY"
  TEXT=${BASE_TEXT:-}
  for f in "$REPO/../shared/data/tinyshakespeare/input.txt" "$REPO/data/shakespeare/input.txt" \
           "$REPO/data/shakespeare_char/input.txt"; do
    [ -z "$TEXT" ] && [ -f "$f" ] && TEXT=$(cd "$(dirname "$f")" && pwd)/input.txt
  done
  TEXT=${TEXT:-https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt}
  TOK_CMD="$PY $REPO/data/custom/prepare.py --input=$TEXT --tokenizer=bpe --vocab_size=2048 --out_dir=data/base"
  MID_MIX=${MID_MIX:-arith,products}
  SFT_MIX=${SFT_MIX:-arith,products}
  RL_MIX=${RL_MIX:-products}
  CHAT_N=${CHAT_N:-20000}
  CHAT_TASKS=${CHAT_TASKS-}  # hub benchmarks to add (downloaded), e.g. arc_easy,gsm8k
  EVAL_LIMIT=${EVAL_LIMIT:-200}  # questions a task (CORE: rows a task)
  CORE_DIR=${CORE_DIR:-}
  RUN_CORE=$([ -n "$CORE_DIR" ] && echo 1 || echo 0)
fi
TRAIN_EXTRA="" BASE_EXTRA="" RL_EXTRA="" EVAL_EXTRA="" PREP_EXTRA=""
if [ "$SMOKE" = 1 ]; then  # a few iterations and a few questions a stage, tiny shapes
  TOK_CMD=${TOK_CMD/--vocab_size=2048/--vocab_size=300}
  TRAIN_EXTRA="--max_iters=4 --eval_interval=4 --eval_iters=2 --log_interval=1 --warmup_iters=1 --lr_decay_iters=4 --batch_size=4 --block_size=64"
  BASE_EXTRA="--n_layer=1 --n_head=2 --n_embd=32"
  RL_EXTRA="--max_iters=2 --questions_per_step=2 --samples_per_question=2 --eval_interval=2 --eval_questions=4 --eval_samples=2 --max_new_tokens=24"
  EVAL_EXTRA="--max_new_tokens=24 --batch_size=8"
  PREP_EXTRA="--n_val=20"
  CHAT_N=200 EVAL_LIMIT=8
fi
CHAT_PREP="$PY $REPO/data/chat/prepare.py --tokenizer_from=data/base --n_train=$CHAT_N $PREP_EXTRA"
# the built-in tasks' held-out questions alone (the same as in the mixes: a task's val comes first from its seed)
BUILT_IN="arith products"
EVAL_PREP="$PY $REPO/data/chat/prepare.py --tokenizer_from=data/base --n_train=1 $PREP_EXTRA"

stage() {  # stage NAME COMMAND: run COMMAND (a shell line, in OUT) unless NAME is done; log it; mark it done
  local name=$1 command=$2
  if [ -n "$STAGE" ] && [ "$STAGE" != "$name" ]; then return 0; fi
  if [ -z "$STAGE" ] && [ -f "stages/$name.json" ]; then echo "== $name: done (stages/$name.json), skipped"; return 0; fi
  rm -f "stages/$name.json"
  if [ "$name" != eval ]; then rm -f stages/eval.json "eval/$name"-*.json; fi  # its model's scores are stale
  echo "== $name: $command"
  local t0 t1
  t0=$(date +%s.%N)
  ( eval "$command" ) 2>&1 | tee "logs/$name.log"
  t1=$(date +%s.%N)
  # the marker, written whole or not at all: what ran and how long it took
  $PY -c 'import json, os, sys, time
name, command, t0, t1, repo, size = sys.argv[1:]
with open(f"stages/{name}.json.tmp", "w") as f:
    json.dump(dict(stage=name, command=command.replace(repo + "/", ""), size=size, wall_s=float(t1) - float(t0),
                   finished=time.strftime("%Y-%m-%d %H:%M:%S")), f)
os.replace(f"stages/{name}.json.tmp", f"stages/{name}.json")' "$name" "$command" "$t0" "$t1" "$REPO" "$SIZE"
}

train() {  # train STAGE [more settings]: train.py with the stage's config; the stage's out_dir starts empty
  echo "rm -rf $1 && $TRAIN $REPO/train.py $REPO/config/speedrun_${SIZE}_$1.py $TRAIN_EXTRA ${*:2}"
}

# the ChatCORE-like table: each model on the held-out questions of every built-in task (eval/<model>-<task>.json),
# then in one chat_eval.py: its bits per byte on SFT's val replies, the hub's chat benchmarks (GPU run) and CORE
# (base and mid, with a bundle) into eval/<model>-scores.json. A finished file is not computed again.
evaluate() {
  local m=$1 ev="$PY $REPO/chat_eval.py --out_dir=$1 --limit=$EVAL_LIMIT $EVAL_EXTRA" tasks=bpb
  for t in $BUILT_IN; do
    [ -f "eval/$m-$t.json" ] || $ev --task=jsonl --input=data/eval_$t/val.jsonl --json_out=eval/$m-$t.json
  done
  [ -n "$CHAT_TASKS" ] && tasks="$tasks,$CHAT_TASKS"
  if [ "$RUN_CORE" = 1 ] && { [ "$m" = base ] || [ "$m" = mid ]; }; then tasks="$tasks,core"; fi
  [ -f "eval/$m-scores.json" ] || $ev --task=$tasks --dataset=sft ${CORE_DIR:+--data_dir=$CORE_DIR} --json_out=eval/$m-scores.json
}

stage tok "$TOK_CMD"
stage base "$(train base $BASE_EXTRA)"
stage mid "$CHAT_PREP --mix=$MID_MIX --out_dir=data/mid && $(train mid)"
stage sft "$CHAT_PREP --mix=$SFT_MIX --out_dir=data/sft && $(train sft)"
stage rl "$CHAT_PREP --mix=$RL_MIX --out_dir=data/rl && rm -rf rl && $TRAIN $REPO/rl.py $REPO/config/speedrun_${SIZE}_rl.py $RL_EXTRA"
stage eval "for t in $BUILT_IN; do $EVAL_PREP --task=\$t --out_dir=data/eval_\$t; done && for m in base mid sft rl; do evaluate \$m; done"
$PY "$REPO/report.py" --out="$OUT"
