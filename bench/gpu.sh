#!/usr/bin/env bash
# The GPU benchmark, for a machine with one GPU (target: under 8 minutes; docs/performance.md, "GPU"):
# every part runs under a time limit (LIMIT below), and the limits with their kill delays add up to
# 465 s, so the whole script ends inside one 600 s device call even when every part hangs.
# A Qwen2-0.5B-shaped model (494M parameters) built from a config with random weights, a tokenizer
# trained locally on generated data (no download), bfloat16 with SDPA attention, ours against TRL's
# defaults, each side in fresh processes, 2 alternating rounds:
#   1. SFT  (bench/sft_rm_vs_trl.py --gpu): tokens/s, peak GPU memory (torch.cuda.max_memory_allocated)
#   2. DPO  (bench/dpo_vocab.py --gpu): the same
#   3. `dpolab dpo` under `accelerate launch` with FSDP on one process (examples/accelerate/fsdp.yaml,
#      --num_processes 1), then final/ reloaded with transformers and run on the GPU.
#
#   bash bench/gpu.sh            # on the GPU machine; JSON results and the log go to $OUT (default bench/)
#   bash bench/gpu.sh --dry-run  # anywhere, CPU only, about a minute: every Python piece imports and parses
#                                # its arguments, every side's config builds, the model config instantiates
#                                # on the meta device, the FSDP config parses and `dpolab dpo --dry-run`
#                                # accepts the FSDP step's flags on a tiny model; the commands are printed
#
# PYTHON: the interpreter (default .venv-bench/bin/python, else .venv/bin/python, else python3); it needs torch (with CUDA
# for the real run), transformers, trl, accelerate, datasets and dpolab (the Makefile's .venv-bench).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv-bench/bin/python ]]; then PYTHON=.venv-bench/bin/python
  elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
RESULTS=${OUT:-bench}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error

# The FSDP step's training flags (the dry run checks them with `dpolab dpo --dry-run`).
FSDP_ARGS=(--mixed-precision bf16 --max-steps 10 --batch-size 8 --eval-fraction 0 --logging-steps 5 --no-progress)
SFT_CMD=("$PYTHON" bench/sft_rm_vs_trl.py --gpu --workdir "$WORK/sft" --json "$RESULTS/gpu_sft_results.json")
DPO_CMD=("$PYTHON" bench/dpo_vocab.py --gpu --workdir "$WORK/dpo" --json "$RESULTS/gpu_dpo_results.json")
FSDP_CMD=("$PYTHON" -m accelerate.commands.launch --config_file examples/accelerate/fsdp.yaml --num_processes 1
          -m dpolab dpo --model "$WORK/dpo/qwen0.5b" --data "$WORK/dpo/pairs.jsonl" --output-dir "$WORK/fsdp"
          "${FSDP_ARGS[@]}")

# Each part's time limit in seconds; `timeout` sends SIGKILL KILL_AFTER seconds after its SIGTERM.
KILL_AFTER=5
declare -A LIMIT=([environment]=30 [sft]=180 [dpo]=150 [fsdp]=60 [reload]=20)
PARTS=(environment sft dpo fsdp reload)
total=0
for part in "${PARTS[@]}"; do total=$((total + LIMIT[$part] + KILL_AFTER)); done
printf 'time limits:'; for part in "${PARTS[@]}"; do printf ' %s %s s,' "$part" "${LIMIT[$part]}"; done
echo " each plus ${KILL_AFTER} s to kill: at most ${total} s in all"

echo "commands (the real run; $WORK is a temporary folder):"
printf '  '; printf '%q ' "${SFT_CMD[@]}"; echo
printf '  '; printf '%q ' "${DPO_CMD[@]}"; echo
printf '  '; printf '%q ' "${FSDP_CMD[@]}"; echo
echo "  then: reload $WORK/fsdp/final with AutoModelForCausalLM and run it on the GPU"

if (( DRY )); then
  # One interpreter for all checks: the imports are the slow part on a busy CPU.
  "$PYTHON" - "$WORK" "${FSDP_ARGS[@]}" <<'EOF'
import contextlib
import io
import json
import runpy
import sys
import time
from pathlib import Path

t0 = time.time()
work, fsdp_args = Path(sys.argv[1]), sys.argv[2:]
for script in ("bench/sft_rm_vs_trl.py", "bench/dpo_vocab.py"):
    sys.argv = [script, "--gpu", "--dry-run", "--workdir", str(work / Path(script).stem)]
    runpy.run_path(script, run_name="__main__")

from accelerate.commands.config.config_args import load_config_from_file

cfg = load_config_from_file("examples/accelerate/fsdp.yaml")
assert cfg.distributed_type.value == "FSDP", cfg.distributed_type
print(f"dry run: examples/accelerate/fsdp.yaml parses: {cfg.distributed_type.value}, "
      f"{cfg.fsdp_config.get('fsdp_sharding_strategy')}, {cfg.fsdp_config.get('fsdp_state_dict_type')}")

from dpolab.cli import main
from dpolab.lm.tiny import tiny_llama, train_tokenizer

rows = [json.loads(x) for x in (work / "dpo_vocab" / "pairs.jsonl").read_text().splitlines()]
tok = train_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=300)
tiny_llama(len(tok), hidden_size=32, layers=1, heads=2, tokenizer=tok).save_pretrained(work / "tiny")
tok.save_pretrained(work / "tiny")
report = io.StringIO()
with contextlib.redirect_stdout(report):  # its config dump: shown only if it fails
    rc = main(["dpo", "--model", str(work / "tiny"), "--data", str(work / "dpo_vocab" / "pairs.jsonl"),
               "--output-dir", str(work / "fsdp-dry"), *fsdp_args, "--dry-run"])
assert rc == 0, f"dpolab dpo --dry-run exited {rc}:\n{report.getvalue()}"
print(f"dry run: dpolab dpo accepts the FSDP step's flags; all checks passed in {time.time() - t0:.0f} s")
EOF
  exit $?
fi

mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_log.txt"
: > "$LOG"
failed=()
# step NAME CMD...: run under the part's time limit (LIMIT), log, remember a failure and go on (each
# part is reported on its own); the limits add up to under 8 minutes, so a hung part cannot take the machine
step() {
  local name=$1 limit=${LIMIT[$1]}; shift
  echo "== $name: $(date -u +%H:%M:%S) (limit ${limit} s)" | tee -a "$LOG"
  if ! timeout --kill-after="$KILL_AFTER" "$limit" "$@" 2>&1 | tee -a "$LOG"; then failed+=("$name"); fi
}
step environment "$PYTHON" -c "
import torch, transformers, trl, accelerate, dpolab
assert torch.cuda.is_available(), 'no CUDA device visible to torch'
print(torch.cuda.get_device_name(0), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers',
      transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__)"
if [[ " ${failed[*]} " == *" environment "* ]]; then echo "gpu.sh: the environment is not usable" >&2; exit 1; fi
step sft "${SFT_CMD[@]}"
step dpo "${DPO_CMD[@]}"
if [[ -d "$WORK/dpo/qwen0.5b" ]]; then
  step fsdp "${FSDP_CMD[@]}"
  step reload "$PYTHON" - "$WORK/fsdp/final" <<'EOF'
import sys

import torch
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).cuda()
n = sum(p.numel() for p in model.parameters())
ids = torch.randint(0, 1000, (2, 64), device="cuda")
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert torch.isfinite(logits).all(), "non-finite logits from the reloaded model"
print(f"reloaded final/: {n / 1e6:.1f}M parameters, logits {tuple(logits.shape)} finite")
EOF
else
  failed+=(fsdp)
fi
echo "== done $(date -u +%H:%M:%S); failed: ${failed[*]:-none}" | tee -a "$LOG"
(( ${#failed[@]} == 0 ))
