#!/usr/bin/env bash
# The GPU paths in one run, for a machine with an NVIDIA GPU: installs a CUDA torch into .venv, then trains with bf16
# autocast and pinned prefetch, trains with the optimizer offloaded to the CPU, splits a model across the GPU and the
# CPU for generate, serves it, and prints the figures (JSON lines from the bench scripts, the CLI's own lines).
# Sized for a few minutes of device time; each step has its own time limit so one hang does not eat the rest.
#
#   bash bench/gpu_check.sh            # TORCH= picks the wheel, default the CUDA 12.8 build
set -uo pipefail
cd "$(dirname "$0")/.."
TORCH="${TORCH:-torch --index-url https://download.pytorch.org/whl/cu128}"
step() { echo; echo "=== $1"; shift; timeout "${LIMIT:-240}" "$@"; echo "--- exit $?"; }

step "install" make setup TORCH="$TORCH"
H=.venv/bin/hetlm
PY=.venv/bin/python
step "the GPU" nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
step "plan (train)" $H plan --config configs/tiny.yaml
step "plan (measured bandwidths, generate)" $H plan --measure --workload generate --config configs/tiny.yaml

WORK=$(mktemp -d)
# A slice of the standard library: a corpus that needs no download.
$PY - "$WORK/corpus.txt" <<'EOF'
import sys, sysconfig
from pathlib import Path
files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
Path(sys.argv[1]).write_text("".join(f.read_text(encoding="utf-8", errors="replace") for f in files), encoding="utf-8")
EOF
step "preprocess" $H preprocess "$WORK/corpus.txt" --out "$WORK/data" --vocab-size 4096
SHAPE=(--set data.dir="$WORK/data" --set model.n_layers=6 --set model.d_model=384 --set model.n_heads=6
       --set model.context_length=256 --set train.max_steps=200 --set train.eval_every=100 --set train.log_every=50)
step "train on cuda: bf16 autocast, pinned prefetch" $H train --out "$WORK/run" "${SHAPE[@]}" --set device.device=cuda
step "train with the AdamW state offloaded to the CPU" $H train --out "$WORK/offload" "${SHAPE[@]}" \
    --set device.device=cuda --set train.optimizer_offload=on --set train.max_steps=100
step "eval on cuda" $H eval "$WORK/run"
step "generate on cuda" $H generate "$WORK/run" --prompt "def main(" -n 200 -t 0 --verbose
step "generate split: blocks 0-2 on the CPU, 3-5 and the head on cuda:0" $H generate "$WORK/run" --prompt "def main(" \
    -n 200 -t 0 --verbose --set device.layers=cpu=0-2,cuda:0=3-5
step "deploy" $H deploy "$WORK/run" --out "$WORK/bundle" --format all --dtype bf16

PORT=8765
$H serve "$WORK/bundle" --port $PORT > "$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 60); do curl -fs "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 1; done
step "serve: health, a completion, metrics" bash -c "curl -fs http://127.0.0.1:$PORT/health; echo;
  curl -fs http://127.0.0.1:$PORT/v1/completions -H 'Content-Type: application/json' \
    -d '{\"model\": \"bundle\", \"prompt\": \"def main(\", \"max_tokens\": 32, \"temperature\": 0}'; echo;
  curl -fs http://127.0.0.1:$PORT/metrics | grep -E '^hetlm_(requests|completion_tokens)' | head"
kill $SERVER
cat "$WORK/serve.log"

step "bench: a split across the GPU and the CPU" $PY bench/placement.py --real --new-tokens 200 --repeats 3
LIMIT=300 step "bench: predicted against measured memory on cuda" $PY bench/memory.py --device cuda --steps 20 --rounds 1
step "bench: training speed" $PY bench/train.py --rounds 2
rm -rf "$WORK"
