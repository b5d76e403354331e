#!/usr/bin/env bash
# The GPU check: the gpu-marked tests, then the benchmark suite (benchmarks/suite.py: data alone, synthetic
# compute ceiling, trainer end to end, plain loop) for ResNet-50, ResNet-18, VGG-16 and AlexNet with bf16,
# channels_last, fused SGD and DALI decoding on the GPU, on ImageNet-sized JPEGs, and the data pipelines against the
# machine's decode ceiling (benchmarks/data_pipelines.py). Sized for 8 minutes on an H200.
#
#   bash scripts/gpu_check.sh OUT_DIR          # on a GPU machine
#   bash scripts/gpu_check.sh OUT_DIR --dry    # the same steps on the CPU at toy sizes (the tests run this)
#
# Writes OUT_DIR/pytest-gpu.log, OUT_DIR/<measurement>/bench.{json,md}, OUT_DIR/data-pipelines.{json,txt} and
# OUT_DIR/summary.md.
# JPEGs: the 1000 ILSVRC samples of $SAMPLES (default ../shared/data/imagenet-samples) where they exist, else
# rendered ones at ImageNet's size (benchmarks/jpeg_set.py). Where DALI or Hydra cannot be imported (the lent GPU
# machine), the wheels staged in $STAGE (default /tmp/stage; see ../shared/device/README.md) go to /tmp/site.
set -euo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--dry]}
mode=${2:-full}
[[ $mode == full || $mode == --dry ]] || { echo "unknown mode $mode: give --dry or nothing" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$root"
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}

work=$(mktemp -d)  # the JPEGs and caches: not in OUT_DIR, which a GPU machine sends back
trap 'rm -rf "$work"' EXIT

if ! $python -c "import nvidia.dali, hydra" 2>/dev/null; then
  stage=${STAGE:-/tmp/stage}
  compgen -G "$stage/chunk.*" >/dev/null \
    || { echo "DALI or Hydra is missing and $stage holds no staged wheels (see ../shared/device/README.md)" >&2; exit 2; }
  cat "$stage"/chunk.* | tar -x -C "$stage"
  $python -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site "$stage"/whl/*
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

if [[ $mode == --dry ]]; then  # every step, at sizes a 2-core CPU runs in a minute or two
  steps=(--warmup 1 --windows 2 --window-steps 2)  # fp32: CPUs without bf16 units emulate it, 3x slower
  device=(trainer.accelerator=cpu trainer.precision=32-true data.spec.image_size=64 data.spec.val_resize_size=73)
  batches=(resnet50=4 resnet18=8 vgg16=2 alexnet=8)
  jpegs=(--per-class 1 --copies 1 --short-side 80)
  pipelines=(--threads 1 --batch 8 --epochs 1 --repeats 1)
  limit=600
else
  steps=(--warmup 10 --windows 5 --window-steps 10)
  device=()
  batches=(resnet50=256 resnet18=256 vgg16=128 alexnet=512)
  jpegs=(--copies 12)
  pipelines=(--epochs 2 --repeats 3)
  limit=150  # seconds per benchmark: a stuck one costs this much of the budget, not all of it
fi
samples=${SAMPLES:-$root/../shared/data/imagenet-samples}
if [[ $mode == full && -d $samples ]]; then jpegs+=(--from "$samples"); fi

failed=()
echo "== gpu-marked tests"
$python -m pytest -m gpu -p no:cacheprovider -q -rs tests 2>&1 | tee "$out/pytest-gpu.log" | tail -5 \
  || failed+=("gpu-tests")

echo "== JPEGs: $($python -m benchmarks.jpeg_set "$work/jpegs" "${jpegs[@]}")"
common=(data.root="$work/jpegs/root" data.index=none paths.cache_dir="$work/cache" "${device[@]}")

echo "== data pipelines against the machine's decode ceiling"  # the val folder: each JPEG once
if ! timeout "$limit" $python -m benchmarks.data_pipelines "$work/jpegs/root/val" "${pipelines[@]}" \
  --json "$out/data-pipelines.json" 2>"$out/data-pipelines.log" | tee "$out/data-pipelines.txt" | tail -7; then
  echo "!! data-pipelines failed or ran past ${limit}s: see $out/data-pipelines.log"
  failed+=("data-pipelines")
fi

bench() {  # bench NAME [suite options and overrides...]
  local name=$1; shift
  echo "== $name"
  if ! timeout "$limit" $python -m benchmarks.suite --out "$out/$name" "${steps[@]}" "$@" "${common[@]}" \
    2>"$out/$name.log" | tail -12; then
    echo "!! $name failed or ran past ${limit}s: see $out/$name.log"
    failed+=("$name")
  fi
}
for entry in "${batches[@]}"; do
  model=${entry%=*} batch=${entry#*=}
  case $model in
    resnet*) preset=(experiment=resnet50_fast model="$model") ;;
    *) preset=(experiment="$model") ;;
  esac
  bench "$model" "${preset[@]}" data.batch_size="$batch"
done
resnet50=(experiment=resnet50_fast data.batch_size="${batches[0]#*=}")
bench resnet50-data-hw0.9 --only data "${resnet50[@]}" data.loader.hw_decoder_load=0.9
if [[ $mode == full && $SECONDS -lt 330 ]]; then  # torch.compile's time and gain, if the budget allows
  bench resnet50-compiled --only synthetic "${resnet50[@]}" model.compile=true
fi

{
  echo "# GPU check ($mode), $(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS}s"
  echo
  tail -1 "$out/pytest-gpu.log"
  echo "failed benchmarks: ${failed[*]:-none}"
  printf '\n## data pipelines\n\n```\n%s\n```\n' "$(tail -7 "$out/data-pipelines.txt")"
  for report in "$out"/*/bench.md; do
    printf '\n## %s\n\n' "$(basename "$(dirname "$report")")"
    cat "$report"
  done
} >"$out/summary.md"
echo "== done in ${SECONDS}s: $out/summary.md; failed: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
