#!/usr/bin/env bash
# Everything a borrowed GPU machine should run for knormctl, in one call of under 10 minutes:
# the CUDA tests (tests/test_cuda.py: graph replay vs DynamicCache logits, peak memory, CUDA
# events, ...), then gpu_check.py's 8B-shape parts (e: compression never raises the peak;
# f: the decode step vs the memory floor, --decode-step launched/static/graph; g: capacity at 70 GiB).
# Output lands in $OUT (the device tool's folder) or ./gpu-out, one file per step.
#
#   bash benchmarks/gpu_session.sh            # parts ef (170 s at most), then g (250 s at most)
#   bash benchmarks/gpu_session.sh ef         # skip the capacity search (one call, 420 s at most)
#   KNORMCTL_COMMIT=<hash> bash benchmarks/gpu_session.sh   # the device's copy has no .git: name the commit
#
# The CUDA image holds torch, transformers, accelerate, typer, rich and matplotlib, which is
# all these two steps import; knormctl runs from this checkout (PYTHONPATH), not installed.
# Wheels in .whl/ (carried: see the device tool's README) are installed first if present.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
  git log -1 --format='knormctl %h %s' 2>/dev/null || echo "knormctl ${KNORMCTL_COMMIT:-? (no .git here)}"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA GPU here: nothing to check (gpu_check.py would build the 8B shape on the CPU)" >&2; exit 1; }
# -k: a step still running 10 s after its TERM (a long CUDA call) is killed, so the next one starts
rc=0  # the first step's failure (a failed test, 124 for a timeout) is the script's exit code
timeout -k 10 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py 2>&1 | tee "$out/test_cuda.txt"
status=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] || rc=$status
if [ -z "${1:-}" ]; then
  # two processes, so an overrun of the capacity search (g: ~74 row prefills of 32k tokens,
  # estimated 150-190 s on an H200) cannot take e and f's summary with it: 170 + 250 s, as the
  # 420 s of one call (g builds the model again and makes its own graph trial: ~20 s)
  timeout -k 10 170 python3 benchmarks/gpu_check.py --device cuda --parts ef 2>&1 | tee "$out/gpu_check.txt"
  status=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] || rc=$status
  timeout -k 10 250 python3 benchmarks/gpu_check.py --device cuda --parts g 2>&1 | tee "$out/gpu_check_g.txt"
  status=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] || rc=$status
else
  timeout -k 10 420 python3 benchmarks/gpu_check.py --device cuda --parts "$1" 2>&1 | tee "$out/gpu_check.txt"
  status=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] || rc=$status
fi
exit "$rc"
