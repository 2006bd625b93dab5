"""PBT against constant hyperparameters, same members, same steps, in one invocation: a population of 8 trained
with hydra/sweeper=ppo_pbt, and the same 8 initial draws trained with their values held constant (ppo_pbt with
one generation: no exploit, no explore), on each of two seeds.

    python benchmarks/pbt_schedule.py                       # Acrobot-v1, 8 members, 81,920 steps, 8 generations
    python benchmarks/pbt_schedule.py --env LunarLander-v3 --steps 300000

Each member's objective is its final evaluation (--episodes episodes, deterministic). The table gives the best
PBT member against the best of the 8 constant runs, and the population means; both arms train 8 x --steps steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def population(args: argparse.Namespace, seed: int, interval: int, sweep: Path) -> tuple[list[float], float]:
    cmd = [str(Path(sys.executable).parent / "ppo-train"), "-m", "hydra/sweeper=ppo_pbt",
           f"hydra.sweeper.population={args.population}", f"hydra.sweeper.interval={interval}",
           f"hydra.sweeper.seed={seed}", f"seed={100 * seed + 1}", f"env={args.env}",
           f"algo.total_timesteps={args.steps}", f"eval.episodes={args.episodes}", "eval.every_steps=0",
           "env.num_envs=4", "algo.n_steps=256", "algo.batch_size=64",  # a rollout of 1,024 steps
           "checkpoint_interval=0", f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{sweep} failed:\n{proc.stderr[-3000:]}")
    lineage = json.loads((sweep / "pbt_lineage.json").read_text())
    scores = [m["objective"] if m["objective"] is not None else float("-inf") for m in lineage["members"]]
    if max(scores) == float("-inf"):
        errors = {json.loads(p.read_text()).get("error") for p in sweep.glob("*/result.json")} - {None}
        sys.exit(f"{sweep}: every member failed: {errors}")
    return scores, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Acrobot-v1")
    p.add_argument("--steps", type=int, default=81_920, help="per member; generations must be whole rollouts (1,024)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--keep", type=Path, help="keep the sweeps in this folder")
    args = p.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="pbt_schedule_"))
    print(f"{args.env}: population {args.population}, {args.steps:,} steps per member, PBT in {args.generations} "
          f"generations of {args.steps // args.generations:,} steps; final evaluation over {args.episodes} episodes; "
          f"sweeps in {folder}")
    print("| seed | arm | best member | population mean | wall time |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        for arm, interval in (("constant", args.steps), ("PBT", args.steps // args.generations)):
            scores, wall = population(args, seed, interval, folder / f"seed{seed}_{arm}")
            print(f"| {seed} | {arm} | {max(scores):.1f} | {sum(scores) / len(scores):.1f} | {wall:.0f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
