#!/usr/bin/env bash
# Stages what the lent GPU machine lacks, in parts that fit one transfer each (64 MiB per `run` call, working tree
# included). The project's own copy of ../shared/device/stage-wheels.sh (read-only, and absent outside this
# workplace), which staged a hand-made list and missed DALI's `six`: here pip resolves the dependencies from the
# wheels' own metadata, for the GPU machine's Python 3.12 on Linux, and a check fails if any is left out.
#
#   bash scripts/stage_wheels.sh                  # wheels -> .dev/part1 ... .dev/partN, 55 MiB each
#   bash scripts/stage_wheels.sh --jpegs [MiB]    # a subset of the ILSVRC samples -> .dev/jpegs (default 55 MiB)
#   bash scripts/stage_wheels.sh --check WHEEL_DIR PREINSTALLED_FILE   # the dependency check alone
#
# Staged: DALI, Hydra and rich at requirements.txt's pins (EXTRA_WHEELS="name==version ..." adds more) with every
# dependency that the GPU machine does not already have. It has torch, torchvision, pytorch-lightning, torchmetrics,
# numpy, pillow and pytest, so those and their own dependencies (read from this machine's installed metadata,
# evaluated for Python 3.12 on Linux) are left out: their list goes to .dev/preinstalled.txt. On the GPU machine,
# scripts/gpu_check.sh installs the parts collected in /tmp/stage (README.md, "The GPU check").
# Environment: PYTHON (default .venv/bin/python), SAMPLES (default ../shared/data/imagenet-samples), STAGE_OUT (the
# folder written instead of .dev).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
out=${STAGE_OUT:-.dev}
part_size=55M  # a part plus the working tree (under 1 MiB) stays under one transfer's 64 MiB

# The GPU machine's interpreter, for environment markers: Python 3.12, CPython, x86_64 Linux.
target_env='{"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
  "implementation_version": "3.12.3", "platform_python_implementation": "CPython", "os_name": "posix",
  "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "platform_release": "",
  "platform_version": ""}'

# check WHEEL_DIR PREINSTALLED_FILE: every Requires-Dist of every wheel (with the extras asked of it), under the
# target's markers, is met by a wheel there (name and version) or by a name in PREINSTALLED_FILE; else it names
# what is missing and exits 1.
check() {
  TARGET_ENV=$target_env "$python" - "$1" "$2" <<'EOF'
import json, os, sys, zipfile
from pathlib import Path
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

folder, preinstalled_file = Path(sys.argv[1]), Path(sys.argv[2])
env = json.loads(os.environ["TARGET_ENV"])
preinstalled = {canonicalize_name(line.strip()) for line in preinstalled_file.read_text().split() if line.strip()}
wheels = {}  # name -> (version, [Requirement])
for wheel in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        metadata = archive.read(name).decode("utf-8", "replace").split("\n\n", 1)[0]
    fields = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line]
    project = canonicalize_name(next(v for k, v in fields if k == "Name"))
    version = next(v for k, v in fields if k == "Version")
    wheels[project] = (Version(version), [Requirement(v) for k, v in fields if k == "Requires-Dist"])
if not wheels:
    sys.exit(f"no wheels in {folder}")

def applies(requirement, extras):
    marker = requirement.marker
    return marker is None or any(marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))

extras = {name: set() for name in wheels}  # the extras some staged wheel asks of each one, to a fixed point
changed = True
while changed:
    changed = False
    for name, (_, requirements) in wheels.items():
        for requirement in requirements:
            wanted = canonicalize_name(requirement.name)
            if applies(requirement, extras[name]) and wanted in extras and not requirement.extras <= extras[wanted]:
                extras[wanted] |= requirement.extras
                changed = True
missing = []
for name, (version, requirements) in sorted(wheels.items()):
    for requirement in requirements:
        wanted = canonicalize_name(requirement.name)
        if not applies(requirement, extras[name]) or wanted in preinstalled:
            continue
        if wanted not in wheels:
            missing.append(f"{wanted}: no wheel staged, and not preinstalled "
                           f"(required by {name} {version}: {requirement})")
        elif not requirement.specifier.contains(wheels[wanted][0], prereleases=True):
            missing.append(f"{wanted}: {wheels[wanted][0]} staged, {name} {version} requires {requirement}")
if missing:
    sys.exit("missing on the GPU machine:\n  " + "\n  ".join(missing))
print(f"{len(wheels)} wheels: every dependency for Python 3.12 on Linux is staged or preinstalled")
EOF
}

# preinstalled: the GPU machine's packages and, recursively, what they require (Python 3.12, Linux), by name,
# from this machine's installed metadata; a requirement not installed here is listed but not followed.
preinstalled() {
  TARGET_ENV=$target_env "$python" - <<'EOF'
import importlib.metadata as metadata, json, os
try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pip vendors it
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

env = json.loads(os.environ["TARGET_ENV"])
todo = [(name, frozenset()) for name in
        ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "numpy", "pillow", "pytest")]
seen, done = set(), set()
while todo:
    name, extras = todo.pop()
    seen.add(canonicalize_name(name))
    if (canonicalize_name(name), extras) in done:
        continue
    done.add((canonicalize_name(name), extras))
    try:
        requires = metadata.distribution(name).requires or []
    except metadata.PackageNotFoundError:
        continue
    for line in requires:
        requirement = Requirement(line)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({**env, "extra": extra}) for extra in ("", *extras)):
            todo.append((requirement.name, frozenset(requirement.extras)))
print("\n".join(sorted(seen)))
EOF
}

jpegs() {  # jpegs MiB: every other sample first, then the rest, while they fit; copies, not links: they travel
  local budget=$(($1 * 1024 * 1024)) samples=${SAMPLES:-$root/../shared/data/imagenet-samples} total=0 n=0
  local files=() file size
  [[ -d $samples ]] || { echo "no samples at $samples (set SAMPLES)" >&2; exit 2; }
  mapfile -t files < <(find "$samples" -maxdepth 1 -iname '*.jpeg' -printf '%f\n' | sort)
  rm -rf "$out/jpegs"; mkdir -p "$out/jpegs"
  while IFS= read -r file; do
    size=$(stat -c %s "$samples/$file")
    if ((total + size <= budget)); then cp "$samples/$file" "$out/jpegs/"; total=$((total + size)); n=$((n + 1)); fi
  done < <(printf '%s\n' "${files[@]}" | awk 'NR % 2'; printf '%s\n' "${files[@]}" | awk 'NR % 2 == 0')
  echo "$out/jpegs: $n of ${#files[@]} samples, $((total / 1024 / 1024)) MiB ($total bytes)"
}

if [[ $out == .dev ]]; then  # .dev/ stays out of git status and commits
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.dev/' "$exclude" 2>/dev/null || echo '/.dev/' >>"$exclude"
fi

case ${1:-} in
  --check)
    [[ $# -eq 3 ]] || { echo "usage: bash scripts/stage_wheels.sh --check WHEEL_DIR PREINSTALLED_FILE" >&2; exit 2; }
    check "$2" "$3"
    exit ;;
  --jpegs) jpegs "${2:-55}"; exit ;;
  "") ;;
  *) echo "unknown option $1: give --jpegs [MiB], --check WHEEL_DIR PREINSTALLED_FILE or nothing" >&2; exit 2 ;;
esac

pin() { grep -m1 -iE "^$1==" requirements.txt; }
read -ra extra <<<"${EXTRA_WHEELS:-}"
roots=("$(pin nvidia-dali-cuda130)" "$(pin hydra-core)" "$(pin rich)" "${extra[@]}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$out"/part* "$out/whl"; mkdir -p "$out/whl"
preinstalled >"$out/preinstalled.txt"
# antlr4-python3-runtime 4.9.x (Hydra's parser) is published as an sdist only: a pure-Python wheel built here
"$python" -m pip wheel -q --no-deps -w "$work/built" 'antlr4-python3-runtime==4.9.3'
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# with their dependencies, resolved for the GPU machine's interpreter; what it has already is removed after
"$python" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none "${plat[@]}" --find-links "$work/built" -d "$work/whl" "${roots[@]}"
for wheel in "$work"/whl/*.whl; do
  name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
  if grep -qx "$name" "$out/preinstalled.txt"; then rm "$wheel"; else mv "$wheel" "$out/whl/"; fi
done
check "$out/whl" "$out/preinstalled.txt"
ls "$out/whl" >"$out/wheels.txt"
# one tar of everything, split into parts, one folder per part (a part per transfer)
tar -C "$out" -cf "$work/all.tar" whl
split -b "$part_size" -d -a 1 "$work/all.tar" "$work/chunk."
n=0
for chunk in "$work"/chunk.*; do n=$((n + 1)); mkdir -p "$out/part$n"; mv "$chunk" "$out/part$n/"; done
rm -rf "$out/whl"
du -sh "$out"/part*
echo "parts: $n; wheels: $(wc -l <"$out/wheels.txt") ($out/wheels.txt); left out as preinstalled: $out/preinstalled.txt"
