#!/usr/bin/env bash
# Issue 16's GPU figures in one call of the device tool, for a session that is lent a GPU (none of this runs in CI).
#
# Prepare here (the device image has torch with CUDA, but no gymnasium, Hydra or SB3, and no registry):
#   ../shared/tools/device-wheels ale-py==0.12.1                   # for `core`
#   ../shared/tools/device-wheels ale-py==0.12.1 envpool==1.2.5    # for `envpool` (its wheel is ~53 MB of 64 MiB)
# then call the device's run with carry [".whl"] and the command `bash benchmarks/gpu_check.sh core` (about 5
# minutes on an H100: leave room for a rerun in the 15 minutes), and report the figures with the card named.
#
#   core:    the CUDA tests (the CUDA update against the CPU autograd update, cuda training, loading on the CPU);
#            setting A with device=auto against device=cpu; B and G, ppo-cli cuda against SB3 cuda;
#            Breakout, ppo-cli cuda (float32 and bfloat16) against SB3 cuda
#   envpool: Breakout on envpool's envs, ppo-cli cuda (float32 and bfloat16) against SB3 cuda (LeanRL: 6,800 SPS)
set -uo pipefail
mode=${1:-core}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 3
fi
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{
  nvidia-smi -L
  echo "CPUs: $(nproc)"
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  case $mode in
    core)
      python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_device.py
      python3 benchmarks/speed.py --settings A --devices auto cpu --pairs 1
      python3 benchmarks/speed.py --settings B G --devices cuda --sb3-device cuda --pairs 1
      python3 benchmarks/atari.py --device cuda --bf16 --steps 20480
      ;;
    envpool)
      python3 benchmarks/atari.py --device cuda --envpool --bf16 --steps 40960
      ;;
    *) echo "gpu_check.sh: unknown mode '$mode' (core or envpool)"; exit 2 ;;
  esac
} 2>&1 | tee "$out/gpu-check-$mode.txt"
