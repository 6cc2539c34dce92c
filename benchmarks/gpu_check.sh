#!/usr/bin/env bash
# One prepared command for a lent GPU machine (or, with --cpu, a shrunken run on any CPU).
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # GPU: experiments/gpu_decode_bench.yaml as written
#   bash benchmarks/gpu_check.sh OUT_DIR --cpu    # CPU: the same config, shapes shrunk (CI runs this)
#
# Needs jax (with CUDA for the GPU run), flax, optax, numpy, safetensors, tokenizers, pyyaml,
# matplotlib, rich already installed, and optionally torch + transformers (the transformers
# rows); it downloads nothing. kvjax itself is installed from this checkout without
# dependencies or network (or, if pip cannot, imported from the checkout via PYTHONPATH).
# Writes OUT_DIR/env.txt (devices, versions, nvidia-smi), OUT_DIR/decode_bench/ (the
# results folder: summary.md, summary.json, metrics.jsonl/csv, decode_bench.png) and
# OUT_DIR/serving_bench/ (experiments/serving_bench.yaml: the Engine against static batches).
# Exit status: the run's (0 finished, 1 a check failed, 2 a config error).
set -euo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--cpu]}
MODE=${2:-gpu}
case "$MODE" in gpu|--gpu) MODE=gpu ;; --cpu) MODE=cpu ;; *) echo "unknown mode $MODE (--cpu or nothing)" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if ! "$PY" -c "import kvjax" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$ROOT" >/dev/null 2>&1 \
    || export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  echo "date: $(date -Is)  mode: $MODE  commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$PY" - <<'PY'
import importlib, jax
print("jax", jax.__version__, "devices:", [f"{d.platform}:{d.device_kind}" for d in jax.devices()])
for name in ("flax", "optax", "torch", "transformers", "kvjax"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # optional references may be absent
        print(name, "unavailable:", type(e).__name__)
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
} 2>&1 | tee "$OUT/env.txt"

CONFIG="$ROOT/experiments/gpu_decode_bench.yaml"
if [ "$MODE" = cpu ]; then
  # The same kind and code paths on a shape a 2-core CPU runs in well under a minute.
  set -- --set device=cpu --set dtype=float32 --set "decode_bench.presets=[llama-tiny]" \
    --set "decode_bench.model={num_layers: 1, d_model: 64, num_heads: 4, num_kv_heads: 2, head_dim: 16, mlp_dim: 128, max_position: 2048}" \
    --set "decode_bench.batch_sizes=[1, 2]" --set "decode_bench.contexts=[16, 64]" \
    --set decode_bench.new_tokens=4 --set decode_bench.repeats=3 --set decode_bench.min_seconds=0.02 \
    --set decode_bench.copy_mib=8 --set decode_bench.short_max_len=64 --set decode_bench.long_max_len=1024 \
    --set decode_bench.short_live=32 --set decode_bench.hf_max_batch=2 --set decode_bench.time_budget_s=120
else
  set --
  if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)"; then
    echo "gpu_check: JAX sees no GPU (backend $("$PY" -c 'import jax; print(jax.default_backend())')); use --cpu" >&2
    exit 2
  fi
fi
set +e
"$PY" -m kvjax.cli run "$CONFIG" --out "$OUT/decode_bench" "$@" 2>&1 | tee "$OUT/decode_bench.log"
DECODE=${PIPESTATUS[0]}

# The serving bench: kvjax.Engine against static batches of generate (bundled text model).
if [ "$MODE" = cpu ]; then
  set -- --set device=cpu --set serving_bench.requests=4 --set "serving_bench.prompt_len=[4, 9]" \
    --set "serving_bench.output_len=[2, 8]" --set serving_bench.arrival_rate=0 \
    --set serving_bench.shared_prefix=32 --set "serving_bench.suffix_len=[2, 4]" \
    --set serving_bench.max_slots=2 --set serving_bench.page_size=8 --set serving_bench.static_batch=2 \
    --set serving_bench.decode_steps=4 --set serving_bench.prefill_chunk=32 --set serving_bench.repeats=1 \
    --set serving_bench.same_memory_slots=3
else
  set --
fi
"$PY" -m kvjax.cli run "$ROOT/experiments/serving_bench.yaml" --out "$OUT/serving_bench" "$@" 2>&1 \
  | tee "$OUT/serving_bench.log"
SERVING=${PIPESTATUS[0]}
echo "gpu_check: decode_bench exit $DECODE, serving_bench exit $SERVING"
[ "$DECODE" -ne 0 ] && exit "$DECODE"
exit "$SERVING"
