#!/usr/bin/env bash
# The GPU check: Triton kernel correctness, kernel GB/s, decode tokens/s of a random
# Llama-7B-shaped NF4 model with 32 adapters; JSON + Markdown in benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh            # one H200: ~5 min, killed at 8 min (partial report kept)
#   bash benchmarks/gpu_check.sh --smoke    # any CPU: tiny shapes, proves the script end to end
#
# Expects, run from anywhere inside the repository:
#   - python3 (or $PYTHON) with a CUDA build of torch (it ships triton), transformers,
#     safetensors and tokenizers; loraplex itself is used from server/ (no install needed).
#   - bitsandbytes is usually missing on the GPU host: put its wheel (and pytest, which the
#     correctness stage needs to import the test grid, if that is missing too) in .whl/ at the
#     repository root; they are installed from there with no index. A failed install is
#     reported, and only the stages that need the package fail.
#   - ~16 GB free under /tmp for the random model (reused by a second run on the same host).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "[gpu_check] installing wheels from .whl/: $(ls .whl)"
  "$PYTHON" -m pip install --disable-pip-version-check -q --no-index --find-links .whl .whl/*.whl \
    || echo "[gpu_check] warning: installing .whl/ failed; stages that need those packages will report it"
fi

export PYTHONPATH="$PWD/server${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# --signal=INT first so Python unwinds; the report is rewritten after every stage anyway.
exec timeout --signal=INT --kill-after=15 480 "$PYTHON" benchmarks/gpu_check.py "$@"
