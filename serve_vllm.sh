#!/usr/bin/env bash
# Serve a model with vLLM through lcserve. Run with --help for usage.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
  cat <<'USAGE'
Usage: ./serve_vllm.sh [OPTIONS] [MODEL] [PORT] [MAX_NUM_SEQS] [MAX_MODEL_LEN] [GPU_MEM_UTIL] [VLLM_ARGS...]

Serve MODEL with vLLM until Ctrl-C. Every argument is optional; "auto" (or leaving it out)
takes lcserve's planner's choice for the hardware. With no arguments: the embedded default
(Gemma 3 270M, 32k context, with the demo LoRA adapter `writer` mounted) on this machine.

  MODEL          a model folder (config.json + *.safetensors), or "embedded"  [embedded]
  PORT           port to serve on                                             [8000]
  MAX_NUM_SEQS   vLLM's --max-num-seqs: the most sequences it runs in one     [auto: vLLM's default]
                 batch. A cap, not a promise: the plan says how many requests
                 fit at full length, and up to what length all of them fit
  MAX_MODEL_LEN  context window in tokens, at most the model's maximum        [auto: the maximum that fits]
  GPU_MEM_UTIL   fraction of GPU memory in (0, 1]; ignored on the CPU build   [auto: planner]
  VLLM_ARGS      anything after the five (or after --) goes to vLLM unchanged and wins over the plan

Options (anywhere before --):
  --profile NAME               hardware profile to plan for (lcserve deploy profiles) [auto: detected]
  --full-context-requests N    refuse unless N requests of MAX_MODEL_LEN fit in the KV cache at once
  --dry-run                    print the plan, vLLM command and environment as JSON; start nothing

See the plan and the reason for every number with: .venv/bin/lcserve deploy plan --model MODEL

The first run creates .venv, installs lcserve with vLLM (CPU build when nvidia-smi finds no
GPU), prepares the embedded model and trains its demo adapter (about 1 to 2 minutes on
2 cores); later runs reuse them.

Example: ./serve_vllm.sh /models/llama-3.1-8b-writer 8000 9 64000 0.90
USAGE
}

die() { echo "serve_vllm.sh: $*" >&2; exit 2; }
is_auto() { [ -z "$1" ] || [ "$1" = auto ]; }
positive_int() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }

positional=()
passthrough=()
own=()
PROFILE=auto
# The script's own options may stand anywhere before `--`; the first other option (or a sixth
# positional argument) starts what goes to vLLM.
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --profile) [ $# -ge 2 ] || die "--profile needs a NAME (see: lcserve deploy profiles)"; PROFILE="$2"; shift 2 ;;
    --profile=*) PROFILE="${1#--profile=}"; shift ;;
    --full-context-requests)
      [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || die "--full-context-requests needs a positive integer"
      own+=(--full-context-requests "$2"); shift 2 ;;
    --dry-run) own+=(--dry-run); shift ;;
    --) shift; passthrough+=("$@"); break ;;
    -[0-9]*) if [ ${#positional[@]} -lt 5 ] && [ ${#passthrough[@]} -eq 0 ]; then positional+=("$1"); else passthrough+=("$1"); fi; shift ;;
    -*) passthrough+=("$1"); shift ;;
    *) if [ ${#positional[@]} -lt 5 ] && [ ${#passthrough[@]} -eq 0 ]; then positional+=("$1"); else passthrough+=("$1"); fi; shift ;;
  esac
done

MODEL="${positional[0]:-embedded}"
PORT="${positional[1]:-8000}"
MAX_NUM_SEQS="${positional[2]:-auto}"
MAX_MODEL_LEN="${positional[3]:-auto}"
GPU_MEM_UTIL="${positional[4]:-auto}"

positive_int "$PORT" && [ "$PORT" -le 65535 ] || die "PORT must be an integer from 1 to 65535, got '$PORT'"
is_auto "$MAX_NUM_SEQS" || positive_int "$MAX_NUM_SEQS" || die "MAX_NUM_SEQS must be a positive integer or 'auto', got '$MAX_NUM_SEQS'"
is_auto "$MAX_MODEL_LEN" || positive_int "$MAX_MODEL_LEN" || die "MAX_MODEL_LEN must be a positive integer or 'auto', got '$MAX_MODEL_LEN'"
if ! is_auto "$GPU_MEM_UTIL"; then
  [[ "$GPU_MEM_UTIL" =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v u="$GPU_MEM_UTIL" 'BEGIN { exit !(u > 0 && u <= 1) }' \
    || die "GPU_MEM_UTIL must be a number in (0, 1], like 0.90, got '$GPU_MEM_UTIL'"
fi
if [ "$MODEL" != embedded ] && [ ! -d "$MODEL" ] && [[ "$MODEL" == [/.~]* || ! "$MODEL" =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]]; then
  die "MODEL '$MODEL' is not a folder; pass a model folder (config.json + *.safetensors), a hub id (org/name), or leave it out for the embedded default"
fi

BIN="$("$ROOT/scripts/bootstrap.sh")"
if [ "$MODEL" = embedded ]; then
  "$BIN/lcserve" embedded prepare >&2
  "$BIN/lcserve" embedded train-adapter >&2
fi
args=(serve "$MODEL" --port "$PORT" --profile "$PROFILE" --argument-names positional ${own[@]+"${own[@]}"})
is_auto "$MAX_NUM_SEQS" || args+=(--max-num-seqs "$MAX_NUM_SEQS")
is_auto "$MAX_MODEL_LEN" || args+=(--max-model-len "$MAX_MODEL_LEN")
is_auto "$GPU_MEM_UTIL" || args+=(--gpu-memory-utilization "$GPU_MEM_UTIL")
exec "$BIN/lcserve" "${args[@]}" -- ${passthrough[@]+"${passthrough[@]}"}
