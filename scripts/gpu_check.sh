#!/usr/bin/env bash
# The GPU check: the machine (driver, CUDA, clocks, versions), the gpu-marked tests, the data pipelines against the
# machine's decode ceiling (benchmarks/data_pipelines.py) while `nvidia-smi dmon` records the JPEG engine's use,
# then the benchmark suite (benchmarks/suite.py: data alone, synthetic compute ceiling, trainer end to end, plain
# loop) for ResNet-50, ResNet-18, VGG-16 and AlexNet with bf16, channels_last, fused SGD and DALI decoding on the
# GPU; benchmarks/time_to_accuracy.py for ResNet-50 (img/s at 160, 192 and 224 px, the step-time cost of EMA and of
# MixUp/CutMix, and TorchDynamo's compilations through a compiled 160-192-224 ramp). Sized for 8 minutes on an H200.
#
#   bash scripts/gpu_check.sh OUT_DIR JPEG_DIR             # on a GPU machine
#   bash scripts/gpu_check.sh OUT_DIR JPEG_DIR --dry-run   # the same steps on the CPU at toy sizes (a test runs it)
#
# JPEG_DIR: a flat folder of <wnid>_*.JPEG files (`bash scripts/stage_wheels.sh --jpegs` copies a subset of the
# ILSVRC samples that fits one transfer to a GPU machine into .dev/jpegs); the benchmarks read it, linked in the
# ILSVRC layout, and the GPU tests get it as GPU_CHECK_JPEGS. Nothing of it goes into OUT_DIR, which a GPU machine
# sends back.
#
# Steps, in order: wheels (where DALI or Hydra does not import, installs the parts that scripts/stage_wheels.sh
# staged, collected in $STAGE, to /tmp/site), jpegs, env, pytest, data-pipelines, resnet50, time-to-accuracy,
# resnet50-data-hw0.9, resnet18, vgg16, alexnet, resnet50-compiled, time-to-accuracy-compiles (about 4 first
# compilations of ResNet-50, minutes: last, where the budget may have run out; GPU_CHECK_STEPS selects it alone).
# Each runs under `timeout` with its own limit and writes OUT_DIR/<step>.log; its result (status, seconds, key
# figures or its log's tail) is appended to OUT_DIR/summary.md as soon as it ends, so a hang or a kill keeps what
# finished.
# Environment: GPU_CHECK_BUDGET (seconds for the whole check, default 450: a step gets at most what is left, and
# none under 15 s), GPU_CHECK_LIMITS="step=seconds ..." (other limits), GPU_CHECK_STEPS=step,... (only these;
# wheels and jpegs always run), STAGE (default /tmp/stage), PYTHON.
set -euo pipefail
usage="usage: bash scripts/gpu_check.sh OUT_DIR JPEG_DIR [--dry-run]"
mode=full
positional=()
for arg in "$@"; do
  case $arg in
    --dry-run | --dry) mode=dry-run ;;
    -*) echo "unknown mode $arg: give --dry-run or nothing" >&2; exit 2 ;;
    *) positional+=("$arg") ;;
  esac
done
[[ ${#positional[@]} -eq 2 ]] || { echo "$usage" >&2; exit 2; }
out=${positional[0]} jpeg_dir=${positional[1]}
if [[ ! -d $jpeg_dir ]] || [[ -z $(find "$jpeg_dir" -maxdepth 1 -iname '*.jp*g' -print -quit) ]]; then
  echo "JPEG_DIR $jpeg_dir: not a folder of .JPEG files ($usage)" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
jpeg_dir=$(cd "$jpeg_dir" && pwd)
cd "$root"
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo "$root/.venv/bin/python" || echo python3)}
stage=${STAGE:-/tmp/stage} site=/tmp/site
work=$(mktemp -d)  # the linked JPEGs and caches: not in OUT_DIR
export python stage site out work
export GPU_CHECK_JPEGS=$jpeg_dir GPU_CHECK_OUT=$out/gpu-tests  # what the GPU tests read, and where they report

steps=(wheels jpegs env pytest data-pipelines resnet50 time-to-accuracy resnet50-data-hw0.9 resnet18 vgg16 alexnet
  resnet50-compiled time-to-accuracy-compiles)
# only the files that hold gpu-marked tests: another file's import error (matplotlib is absent on the lent
# machine) would stop the run before any GPU test (tests/test_gpu_check.py keeps this list complete)
gpu_test_files=(tests/test_gpu.py tests/test_dali.py tests/test_shard_loading.py tests/test_train.py tests/test_speed.py tests/test_log_start.py)
dmon_steps=" data-pipelines resnet50-data-hw0.9 "  # nvidia-smi dmon runs beside these: is the JPEG engine used?
declare -A limit=([wheels]=180 [jpegs]=60 [env]=60)
if [[ $mode == dry-run ]]; then  # every step, at sizes a 2-core CPU runs in a few minutes
  bench_steps=(--warmup 1 --windows 2 --window-steps 2)  # fp32: CPUs without bf16 units emulate it, 3x slower
  device=(trainer.accelerator=cpu trainer.precision=32-true data.spec.image_size=64 data.spec.val_resize_size=73)
  batches=(resnet50=4 resnet18=8 vgg16=2 alexnet=8)
  copies=1
  pipelines=(--threads 1 --batch 8 --epochs 1 --repeats 1)
  tta=(--sizes 32,48,64 --repeats 1 --warmup 1 --windows 2 --window-steps 2)
  budget=${GPU_CHECK_BUDGET:-3000}
  limit+=([pytest]=300 [data-pipelines]=300 [resnet50]=300 [time-to-accuracy]=300 [resnet50-data-hw0.9]=300
    [resnet18]=300 [vgg16]=300 [alexnet]=300 [resnet50-compiled]=300 [time-to-accuracy-compiles]=300)
else  # limits: what each step takes on an H200 and some room; a stuck step costs its limit, not the budget
  bench_steps=(--warmup 10 --windows 5 --window-steps 10)
  device=()
  batches=(resnet50=256 resnet18=256 vgg16=128 alexnet=512)
  copies=12
  pipelines=(--epochs 2 --repeats 3)
  # per round 5 trainer runs of 25 steps (160, 192, 224 px; 224 with EMA, with mixing, each switched by window),
  # 2 rounds: about 10 s a run
  tta=(--sizes 160,192,224 --repeats 2 --warmup 5 --windows 4 --window-steps 5)
  budget=${GPU_CHECK_BUDGET:-450}
  limit+=([pytest]=210 [data-pipelines]=90 [resnet50]=90 [time-to-accuracy]=120 [resnet50-data-hw0.9]=45
    [resnet18]=60 [vgg16]=75 [alexnet]=60 [resnet50-compiled]=120 [time-to-accuracy-compiles]=240)
fi
for entry in ${GPU_CHECK_LIMITS:-}; do
  [[ -v "limit[${entry%%=*}]" ]] || { echo "GPU_CHECK_LIMITS: no step ${entry%%=*} (steps: ${steps[*]})" >&2; exit 2; }
  limit[${entry%%=*}]=${entry#*=}
done
selected=" wheels jpegs ${GPU_CHECK_STEPS:-${steps[*]}} "
selected=${selected//,/ }
for name in $selected; do
  [[ " ${steps[*]} " == *" $name "* ]] || { echo "GPU_CHECK_STEPS: no step $name (steps: ${steps[*]})" >&2; exit 2; }
done

summary=$out/summary.md
failed=() current="" started=0 dmon_pid="" step_pid=""
stop_dmon() {  # TERM: a background job of a script ignores INT
  if [[ -n $dmon_pid ]]; then kill "$dmon_pid" 2>/dev/null || true; wait "$dmon_pid" 2>/dev/null || true; fi
  dmon_pid=""
}
trap 'stop_dmon; rm -rf "$work"' EXIT
interrupted() {  # stopped from outside: end the step (timeout passes the signal on) and say which was cut short
  if [[ -n $step_pid ]]; then kill -TERM "$step_pid" 2>/dev/null || true; wait "$step_pid" 2>/dev/null || true; fi
  if [[ -n $current ]]; then
    printf '\n## %s: INTERRUPTED (the check was stopped), %s s\n' "$current" "$((SECONDS - started))" >>"$summary"
  fi
  exit 143
}
trap interrupted TERM INT

# dmon NAME: the figures of OUT_DIR/NAME.dmon, `nvidia-smi dmon -s u` (utilisation % per second: sm, mem, enc,
# dec, jpg, ofa; jpg is the JPEG engine, which decodes only when DALI hands it images)
dmon() {
  [[ -s $out/$1.dmon ]] || { echo "dmon: not recorded (no nvidia-smi here)"; return; }
  awk '/^#/ && !header { sub(/^#/, ""); for (i = 1; i <= NF; i++) col[$i] = i; header = 1; next }
    /^#/ || NF == 0 { next }
    { n++
      for (c in col) if ($col[c] ~ /^[0-9]+$/) { k[c]++; sum[c] += $col[c]; if ($col[c] > max[c]) max[c] = $col[c] } }
    END { line = "dmon, " n " samples of 1 s (mean / max %):"
      split("sm mem dec jpg", shown, " ")  # n/a: the GPU has no such unit (dmon prints -)
      for (i = 1; i <= 4; i++) if (shown[i] in col) {
        c = shown[i]
        line = line (k[c] ? sprintf(" %s %.0f / %d;", c, sum[c] / k[c], max[c]) : sprintf(" %s n/a;", c)) }
      print line }' "$out/$1.dmon"
}

figures() {  # figures NAME: the key lines of a step that ended
  local log=$out/$1.log
  case $1 in
    wheels | jpegs) tail -3 "$log" ;;
    env)
      grep -m1 -E "Driver Version|^nvidia-smi: not found" "$log" | tr -s ' |' ' ' | sed -E 's/^ | $//g'
      grep -E "^(versions|devices):" "$log" || true
      # the Clocks and Max Clocks sections of `nvidia-smi -q -d CLOCK`, one line each
      awk '!/ : / { section = $0; gsub(/^ +| +$/, "", section); next }
        section == "Clocks" || section == "Max Clocks" { split($0, kv, " : "); gsub(/^ +| +$/, "", kv[1])
          line[section] = line[section] sprintf(" %s %s,", kv[1], kv[2]) }
        END { for (s in line) { sub(/,$/, "", line[s]); print s ":" line[s] } }' "$log" | sort
      grep -A3 "^pip check:" "$log" | head -4 ;;
    pytest)
      echo '```'
      # each test's outcome (-v), the skip reasons and failures (-rs, short summary), the counts
      local outcomes="::[^ ]+ (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|^(FAILED|ERROR) |^SKIPPED \["
      outcomes+="|[0-9]+ (passed|failed|skipped)"
      grep -E "$outcomes" "$log" | sed -E 's/^tests\///' | tail -30
      echo '```'
      for report in "$GPU_CHECK_OUT"/*.json; do  # what the GPU tests measured
        if [[ -e $report ]]; then echo "- $(basename "$report" .json): $(cat "$report")"; fi
      done ;;
    data-pipelines) printf '```\n%s\n```\n' "$(tail -8 "$log")" ;;
    time-to-accuracy*)
      if [[ -s $out/$1/time_to_accuracy.md ]]; then cat "$out/$1/time_to_accuracy.md"; else tail -5 "$log"; fi ;;
    *) if [[ -s $out/$1/bench.md ]]; then cat "$out/$1/bench.md"; else tail -5 "$log"; fi ;;
  esac
  if [[ $dmon_steps == *" $1 "* ]]; then printf '\n'; dmon "$1"; fi
}

# step NAME COMMAND...: COMMAND under `timeout` (within the budget), output to OUT_DIR/NAME.log, result appended
step() {
  local name=$1 status=0 verdict lim left
  shift
  if [[ $selected != *" $name "* ]]; then
    printf '\n## %s: skipped (not in GPU_CHECK_STEPS)\n' "$name" >>"$summary"
    return
  fi
  lim=${limit[$name]} left=$((budget - SECONDS))
  if ((left < 15)); then
    printf '\n## %s: skipped (%s s of the %s s budget left)\n' "$name" "$left" "$budget" >>"$summary"
    failed+=("$name")
    return
  fi
  ((${lim%.*} <= left)) || lim=$left
  echo "== $name (limit ${lim} s)"
  if [[ $dmon_steps == *" $name "* ]] && command -v nvidia-smi >/dev/null; then
    # stdbuf: a line per sample as it comes, so that a kill leaves every sample taken so far in the file
    stdbuf -oL nvidia-smi dmon -s u -o T -d 1 >"$out/$name.dmon" 2>&1 &
    dmon_pid=$!
  fi
  current=$name started=$SECONDS
  # in the background and waited for, so that a TERM to this script is handled at once; timeout ends the whole
  # process group of the step (DDP ranks, DALI threads), and kills it 10 s later if it is still there
  timeout -k 10 "$lim" "$@" >"$out/$name.log" 2>&1 </dev/null &
  step_pid=$!
  wait "$step_pid" || status=$?
  current="" step_pid=""
  stop_dmon
  case $status in
    0) verdict=ok ;;
    124) verdict="TIMED OUT after ${lim} s (its limit)" ;;
    137) verdict="TIMED OUT after ${lim} s (its limit), killed" ;;
    *) verdict="FAILED (exit $status)" ;;
  esac
  ((status == 0)) || failed+=("$name")
  {
    printf '\n## %s: %s, %s s\n\n' "$name" "$verdict" "$((SECONDS - started))"
    figures "$name" 2>&1 || true
    if ((status != 0)); then printf '\nlast lines of %s.log:\n```\n%s\n```\n' "$name" "$(tail -15 "$out/$name.log")"; fi
  } >>"$summary"
  echo "   $verdict in $((SECONDS - started)) s"
}

install_wheels() {  # the parts of scripts/stage_wheels.sh, collected in $stage, installed to $site
  if "$python" -c "import nvidia.dali, hydra" 2>/dev/null; then
    echo "DALI and Hydra import: nothing to install"
    return
  fi
  compgen -G "$stage/chunk.*" >/dev/null || {
    echo "DALI or Hydra is missing and $stage holds no staged wheels (bash scripts/stage_wheels.sh; README.md)"
    return 2
  }
  rm -rf "$stage/whl" && cat "$stage"/chunk.* | tar -x -C "$stage"
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$stage"/whl/*.whl
  "$python" -c "import nvidia.dali as d, hydra as h; print('installed: DALI', d.__version__, 'Hydra', h.__version__)"
}

env_info() {  # the driver and CUDA versions, the clocks (a GPU held at low clocks measures low), the versions
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi -q -d CLOCK
  else
    echo "nvidia-smi: not found (no NVIDIA driver here)"
  fi
  "$python" -c "
import platform, hydra, nvidia.dali, pytorch_lightning, torch
print(f'versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, '
      f'cuDNN {torch.backends.cudnn.version()}), DALI {nvidia.dali.__version__}, '
      f'Lightning {pytorch_lightning.__version__}, Hydra {hydra.__version__}')
gpus = [f'{i}: {torch.cuda.get_device_name(i)}' for i in range(torch.cuda.device_count())]
print('devices:', ', '.join(gpus) or 'no CUDA device')"
  echo "pip check:"  # a requirement that the staged wheels and the machine's packages leave unmet
  "$python" -m pip check || true
}
export -f install_wheels env_info

# A killed run keeps this file and every entry appended before the kill.
{
  echo "# GPU check ($mode), $(date -u +%Y-%m-%dT%H:%MZ), $(hostname)"
  echo
  echo "JPEG_DIR $jpeg_dir: $(find "$jpeg_dir" -maxdepth 1 -iname '*.jp*g' | wc -l) JPEGs," \
    "$(du -sm "$jpeg_dir" | cut -f1) MiB; budget ${budget} s;" \
    "limits: $(for s in "${steps[@]}"; do printf '%s=%s ' "$s" "${limit[$s]}"; done)"
} >"$summary"

if ! "$python" -c "import nvidia.dali, hydra" 2>/dev/null; then export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}; fi
step wheels bash -c install_wheels  # functions: timeout runs programs
step jpegs "$python" -m benchmarks.jpeg_set "$work/jpegs" --from "$jpeg_dir" --copies "$copies"
step env bash -c env_info
step pytest "$python" -m pytest -m gpu -p no:cacheprovider -v -rs "${gpu_test_files[@]}"
common=(data.root="$work/jpegs/root" data.index=none paths.cache_dir="$work/cache" "${device[@]}")
# the val folder: each JPEG once
step data-pipelines "$python" -m benchmarks.data_pipelines "$work/jpegs/root/val" "${pipelines[@]}" \
  --json "$out/data-pipelines.json"

bench() {  # bench NAME [suite options and overrides...]
  local name=$1
  shift
  step "$name" "$python" -m benchmarks.suite --out "$out/$name" "${bench_steps[@]}" "$@" "${common[@]}"
}
declare -A batch
for entry in "${batches[@]}"; do batch[${entry%=*}]=${entry#*=}; done
resnet50=(experiment=resnet50_fast data.batch_size="${batch[resnet50]}")
bench resnet50 "${resnet50[@]}"
# img/s per size, EMA's and mixing's costs (the compilations: the last step)
step time-to-accuracy "$python" -m benchmarks.time_to_accuracy --out "$out/time-to-accuracy" "${tta[@]}" \
  --only sizes,costs "${resnet50[@]}" "${common[@]}"
bench resnet50-data-hw0.9 --only data "${resnet50[@]}" data.loader.hw_decoder_load=0.9
bench resnet18 experiment=resnet50_fast model=resnet18 data.batch_size="${batch[resnet18]}"
bench vgg16 experiment=vgg16 data.batch_size="${batch[vgg16]}"
bench alexnet experiment=alexnet data.batch_size="${batch[alexnet]}"
if [[ $mode == dry-run && $selected == *" resnet50-compiled "* ]]; then  # a CPU compiles ResNet-50 for minutes
  printf '\n## resnet50-compiled: skipped (dry run: compiling ResNet-50 takes minutes on a CPU)\n' >>"$summary"
else  # torch.compile's time and gain
  bench resnet50-compiled --only synthetic "${resnet50[@]}" model.compile=true
fi
if [[ $mode == dry-run && $selected == *" time-to-accuracy-compiles "* ]]; then  # as above (tests/test_bench.py
  # counts them on the CPU with ResNet-18 at toy sizes)
  printf '\n## time-to-accuracy-compiles: skipped (dry run: compiling ResNet-50 takes minutes on a CPU)\n' >>"$summary"
else  # 2 train batches and 1 val batch per size: the compilations, not the speed
  step time-to-accuracy-compiles "$python" -m benchmarks.time_to_accuracy --out "$out/time-to-accuracy-compiles" \
    "${tta[@]}" --only compiles --compile-batches 2 "${resnet50[@]}" "${common[@]}"
fi

printf '\n**Done** in %s s; failed, timed out or skipped for the budget: %s\n' "$SECONDS" "${failed[*]:-none}" \
  >>"$summary"
echo "== done in ${SECONDS}s: $summary; failed: ${failed[*]:-none}"
[[ ${#failed[@]} -eq 0 ]]
