#!/usr/bin/env bash
# The GPU half of hier-jax's checks, as one short script for a lent GPU machine (no network there):
#   1. versions and the card;
#   2. experiments.bench_torch for ResNet-18 and VGG-16 on CIFAR-10 shapes at batch 128: JAX jit
#      against PyTorch eager (NCHW and channels_last), then against torch.compile, all in fp32
#      without TF32 (two runs per model so that a slow torch.compile cannot cost the eager figures);
#   3. portability: the whole test suite with JAX on the GPU (`tasks.py test --system --backend gpu`:
#      the CPU beside it, precision 'highest', deterministic GPU reductions), with its JUnit XML and
#      a one-page summary (passed, failed, skipped with reasons, the golden trajectory's deviation).
# Results go to $OUT: bench_<model>_<eager|compile>.json, tests/junit.xml, tests/summary.md, logs.
# Usage: OUT=dir bash scripts/gpu_check.sh [all|bench|tests] [timed steps]
set -uo pipefail
OUT=${OUT:-out/gpu}
WHAT=${1:-all}
STEPS=${2:-20}
TEST_TIMEOUT=${TEST_TIMEOUT:-420}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TF_CPP_MIN_LOG_LEVEL=3
# A flax older than the one pyproject.toml pins is replaced by a carried wheel (.whl/, if any).
if python3 -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:3])) < (0, 12, 8))"; then
  echo "flax on the machine is new enough"
elif ls .whl/flax-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/flax-*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi -L
python3 -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__,
'| optax', optax.__version__, '| torch', torch.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee "$OUT/versions.txt"

bench() {  # model, torch modes, tag, time limit (s)
  echo "== bench_torch $1 $2"
  timeout "$4" python3 -m experiments.bench_torch --model "$1" --dataset cifar10 --batch 128 --steps "$STEPS" \
    --warmup 3 --torch-modes "$2" --out "$OUT/tmp" > "$OUT/bench_$1_$3.log" 2>&1
  echo "exit $?"; grep -E "^(resnet18|vgg16) " "$OUT/bench_$1_$3.log" | cut -c1-150
  mv "$OUT/tmp/bench_torch.json" "$OUT/bench_$1_$3.json" 2>/dev/null
}
if [ "$WHAT" != tests ]; then
  bench resnet18 eager,eager_cl eager 100
  bench vgg16 eager,eager_cl eager 100
  bench resnet18 compile compile 140
  bench vgg16 compile compile 140
  rmdir "$OUT/tmp" 2>/dev/null
fi

if [ "$WHAT" != bench ]; then
  echo "== the test suite on the GPU (limit ${TEST_TIMEOUT} s)"
  timeout "$TEST_TIMEOUT" python3 tasks.py test --system --backend gpu --out "$OUT/tests" -p no:cacheprovider \
    > "$OUT/tests.log" 2>&1
  echo "exit $?"; cat "$OUT/tests/summary.md" 2>/dev/null || tail -20 "$OUT/tests.log"
fi
