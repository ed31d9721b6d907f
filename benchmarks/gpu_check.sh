#!/usr/bin/env bash
# The whole GPU check in one command, on one CUDA GPU (the device tool's H100 or H200), in at
# most 9 minutes: `pytest -m gpu`, every case of benchmarks/train_throughput.py, and
# benchmarks/fit_speed_model.py --add-run of each kubetune side. Every raw output goes to OUT.
#
#   benchmarks/gpu_check.sh --fetch-wheels   # here, with a package index: the wheels into .whl/
#   benchmarks/gpu_check.sh OUT              # there: install .whl/ and kubetune, run everything
#   benchmarks/gpu_check.sh --dry-run [OUT]  # the plan: steps, wheels to carry, their size
#
# A bare CUDA PyTorch image (benchmarks/gpu_image_packages.txt: the device's) lacks what CARRY
# names: what kubetune's worker, its tests and the benchmarks import (pydantic, datasets,
# bitsandbytes, liger-kernel: the `gpu` extra's kernels) and what those require in turn. The
# versions are images/constraints.txt's. flash-attn has no wheel on PyPI (sdist only, built
# against the machine's CUDA), so it is not carried; the flash-attention test skips without it.
# tests/test_gpu_check.py checks this plan on a CPU: the steps, that the worker, the GPU tests
# and the benchmarks import nothing else the image lacks, and that the wheels fit the 64 MiB
# the device tool carries.
set -uo pipefail
cd "$(dirname "$0")/.."

# NAME (pinned in images/constraints.txt) or NAME==VERSION (a requirement of one of them)
CARRY=(
  pydantic pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5  # the config
  datasets dill==0.4.1 multiprocess==0.70.19  # the prepared dataset
  bitsandbytes  # method=qlora
  liger-kernel  # train.kernels=auto|liger
  trl  # the DPO case's other side (TRL's DPOTrainer)
)
WHEELS=${GPU_CHECK_WHEELS:-.whl}  # where --fetch-wheels puts them and the install takes them
TIME_LIMIT_S=540  # 9 minutes for everything below
# name|seconds at most|command ($OUT: the output folder, $RUNS: the kept kubetune runs)
STEPS=(
  'pytest-gpu|180|python3 -m pytest -m gpu -n 0 -p no:cacheprovider -rs tests/test_gpu.py tests/test_gpu_faults.py'
  'train-throughput|270|python3 benchmarks/train_throughput.py --steps 20 --keep $RUNS'
  'train-throughput-dpo|60|python3 benchmarks/train_throughput.py --steps 20 --cases llama3-8b-8-layers-dpo-lora-r16'
  'fit-speed-model|30|fit_each_kubetune_side'
)

pin() {  # NAME -> NAME==VERSION from images/constraints.txt; NAME==VERSION stays as it is
  local name=$1 version
  if [[ $name == *==* ]]; then echo "$name"; return; fi
  version=$(grep -iE "^${name//-/[-_]}==" images/constraints.txt | head -1 | cut -d= -f3)
  [[ -n $version ]] || { echo "gpu_check.sh: $name is not pinned in images/constraints.txt" >&2; return 1; }
  echo "$name==$version"
}

plan() {
  echo "steps (each under its own time limit, ${TIME_LIMIT_S} s in all):"
  echo "  install: pip install --no-index --no-deps $WHEELS/*.whl, then kubetune from this tree"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    echo "  $name (${limit} s): $command"
  done
  echo "carry (what a bare CUDA PyTorch image lacks):"
  for name in "${CARRY[@]}"; do echo "  $(pin "$name")"; done
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    du -cb "$WHEELS"/*.whl | tail -1 | awk '{printf "wheels: %d bytes (%.1f MiB) in '"$WHEELS"'/\n", $1, $1 / 1048576}'
  else
    echo "wheels: none in $WHEELS/ yet (benchmarks/gpu_check.sh --fetch-wheels)"
  fi
}

fetch_wheels() {  # the device's Python is 3.12 on x86-64 Linux
  mkdir -p "$WHEELS"
  for name in "${CARRY[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$WHEELS" \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      "$(pin "$name")" || return 1
  done
  plan | tail -1
}

fit_each_kubetune_side() {  # every kept metrics.json as a point, on OUT's copy of the points
  local points=$OUT/speed-calibration.json fitted=$OUT/speed_calibration.json run
  cp docs/benchmarks/speed-calibration.json "$points"
  compgen -G "$RUNS/*.metrics.json" >/dev/null || { echo "no kubetune run was kept"; return 1; }
  for run in "$RUNS"/*.metrics.json; do
    echo "--add-run $(basename "$run")"
    python3 benchmarks/fit_speed_model.py --points "$points" --out "$fitted" --add-run "$run" ||
      return 1
  done
}

install() {
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile "$WHEELS"/*.whl || return 1
  fi
  python3 -m pip install --quiet --no-index --no-deps --no-build-isolation . || return 1
  python3 -c "import kubetune.components.train.worker, bitsandbytes, datasets, liger_kernel, pydantic"
}

case "${1:-}" in
  --dry-run) plan; exit 0 ;;
  --fetch-wheels) fetch_wheels; exit $? ;;
  ""|-*) echo "usage: $0 OUT | --dry-run | --fetch-wheels" >&2; exit 2 ;;
esac

OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "error: cannot write to $1" >&2; exit 2; }
RUNS=$(mktemp -d)
export OUT RUNS PYTHONUNBUFFERED=1
started=$SECONDS
failed=()
# what comes back from the device: at most 8 files, so every step writes one
{
  plan
  nvidia-smi || true
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  echo "== install"
  install || { echo "install failed"; exit 1; }
  python3 -m pip list
} >"$OUT/environment.txt" 2>&1 || { tail -n 20 "$OUT/environment.txt"; exit 1; }
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<<"$step"
  left=$((TIME_LIMIT_S - (SECONDS - started)))
  ((limit > left)) && limit=$left
  echo "== $name (at most ${limit} s)"
  timeout "$limit" bash -c "$(declare -f fit_each_kubetune_side); $command" >"$OUT/$name.txt" 2>&1
  code=$?
  tail -n 25 "$OUT/$name.txt"
  ((code == 0)) || failed+=("$name (exit $code)")
done
# the kept runs as one file: {"run": NAME, "metrics": metrics.json}
python3 - "$RUNS" >"$OUT/kubetune-runs.jsonl" <<'PY'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.metrics.json")):
    print(json.dumps({"run": path.name, "metrics": json.loads(path.read_text())}))
PY
echo "== done in $((SECONDS - started)) s; raw outputs in $OUT"
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}"
  exit 1
fi
