"""Start-up and whole-process time: what every sweep job, evaluation and short run pays before and around training.

    python benchmarks/startup.py                 # 3 repeats of each; medians (min-max)
    python benchmarks/startup.py --repeats 5 --no-sb3

Printed, each a fresh process, all in one invocation so the figures compare:
- `python -c "import torch"`: the floor any torch program pays;
- `ppo-train --help`, and whether importing ppo-train's entry point imports torch (it should not);
- a default run (CartPole, 8 envs x 1024 steps) of one update: seconds until the banner's `training:` line, until
  the first progress line (one update done), and until the process ends;
- the whole process on the defaults for 131,072 steps (evaluation off, as SB3 runs here without one), against
  SB3's PPO with the same hyperparameters as a whole process too (benchmarks/speed.py's setting A worker, its
  imports included), and the ratio. SB3 needs the bench extra: pip install ".[bench]".
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env  # noqa: E402

HERE = Path(__file__).resolve().parent
QUIET = ["eval.every_steps=0", "eval.final=false", "eval.objective=train", "torch_threads=1"]


def _timed(cmd: list[str], marks: tuple[str, ...] = ()) -> dict[str, float]:
    """Run `cmd`; seconds from its start until each of `marks` first begins a line of its output, and until it
    ends ("exit")."""
    env = child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    seen: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as cwd:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail = []
        for line in proc.stdout:
            now = time.perf_counter() - t0
            tail = (tail + [line])[-20:]
            for mark in marks:
                if mark not in seen and line.lstrip().startswith(mark):
                    seen[mark] = now
        code = proc.wait()
        seen["exit"] = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{''.join(tail)}")
    return seen


def _train(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "ppo_cli.cli.train", *QUIET, *overrides]


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-sb3", action="store_true", help="skip the whole-process comparison with SB3")
    args = p.parse_args()
    torch_only, help_, banner, first, one_update, ours, sb3 = [], [], [], [], [], [], []
    loads_torch = subprocess.run([sys.executable, "-c", "import sys, ppo_cli.cli.train; print('torch' in sys.modules)"],
                                 capture_output=True, text=True, env=child_env()).stdout.strip()
    for _ in range(args.repeats):
        torch_only.append(_timed([sys.executable, "-c", "import torch"])["exit"])
        help_.append(_timed([sys.executable, "-m", "ppo_cli.cli.train", "--help"])["exit"])
        run = _timed(_train("algo.total_timesteps=8192"), ("training:", "step"))
        banner.append(run["training:"])
        first.append(run["step"])
        one_update.append(run["exit"])
        ours.append(_timed(_train("algo.total_timesteps=131072"))["exit"])
        if not args.no_sb3:
            sb3.append(_timed([sys.executable, str(HERE / "speed.py"), "--worker", "sb3", "--setting", "A",
                               "--steps", "131072"])["exit"])
    print(f"python -c 'import torch':                 {_spread(torch_only)}")
    print(f"ppo-train --help:                          {_spread(help_)}   (entry point imports torch: {loads_torch})")
    print(f"default run, until the 'training:' banner: {_spread(banner)}")
    print(f"default run, until the first update's line:{_spread(first)}")
    print(f"default run of one update, whole process:  {_spread(one_update)}")
    print(f"ppo-train, 131,072 steps, whole process:   {_spread(ours)}")
    if sb3:
        print(f"SB3 PPO, 131,072 steps, whole process:     {_spread(sb3)}")
        print(f"whole-process ratio SB3 / ppo-cli:         {statistics.median(sb3) / statistics.median(ours):.2f}x")


if __name__ == "__main__":
    main()
