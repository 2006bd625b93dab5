"""Does pruning pay? One ppo_tune search with the median pruner and one without, same sampler seed, same trials,
same budget per trial, in one invocation: the best objective each found, the env steps each trained, wall time.

    python benchmarks/tune_pruning.py                     # 24 trials each on Acrobot-v1, 40k steps per trial
    python benchmarks/tune_pruning.py --trials 8 --steps 20000

The best objective of each search is its best trial's final evaluation (eval.episodes episodes); "within noise"
is judged against the spread of that evaluation (its std over episodes / sqrt(episodes)), printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def search(pruner: str, args: argparse.Namespace, folder: Path) -> dict:
    sweep = folder / pruner
    # ppo_tune's own space (learning rates, clip range, GAE lambda, entropy, epochs), with the rollout fixed by
    # these overrides: a fixed key on the command line leaves the search space.
    cmd = [str(Path(sys.executable).parent / "ppo-train"), "-m", "hydra/sweeper=ppo_tune",
           f"hydra.sweeper.n_trials={args.trials}", f"hydra.sweeper.pruner={pruner}", "hydra.sweeper.seed=0",
           f"hydra.sweeper.pruner_warmup_steps={args.warmup}", f"hydra.sweeper.pruner_min_resource={args.steps // 8}",
           f"env={args.env}",
           f"algo.total_timesteps={args.steps}",
           "env.num_envs=4", "algo.n_steps=256", "algo.batch_size=64", f"eval.every_steps={args.steps // 8}",
           f"eval.episodes={args.episodes}", "checkpoint_interval=0", f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"the {pruner} search failed:\n{proc.stderr[-3000:]}")
    summary = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    results = [json.loads(p.read_text()) for p in sweep.glob("*/result.json")]
    best = json.loads((sweep / str(summary["best_trial"]) / "result.json").read_text())
    spread = best["final_eval"]["std_return"] / args.episodes ** 0.5
    return {"best": summary["best_value"], "spread": spread, "steps": sum(r["global_step"] for r in results),
            "pruned": sum(r["status"] == "pruned" for r in results), "wall": wall, "trial": summary["best_trial"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--env", default="Acrobot-v1")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--steps", type=int, default=40_000)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--warmup", type=int, default=0, help="env steps before the median pruner may prune a trial")
    p.add_argument("--pruners", nargs="+", default=["none", "median", "sha"],
                   help="the searches to run (sha and hyperband start at the first evaluation)")
    p.add_argument("--keep", type=Path, help="keep the two sweeps in this folder")
    args = p.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="tune_pruning_"))
    rows = {pruner: search(pruner, args, folder) for pruner in args.pruners}
    budget = args.trials * args.steps
    print(f"{args.env}: {args.trials} TPE trials of {args.steps:,} steps, evaluated every {args.steps // 8:,} steps "
          f"({args.episodes} episodes); the median pruner after 5 trials and {args.warmup:,} steps, successive "
          f"halving from the first evaluation; sweeps in {folder}")
    print("| pruner | best objective (+- s.e.) | best trial | pruned trials | env steps trained | share of budget "
          "| wall time |")
    print("|---|---|---|---|---|---|---|")
    for pruner, r in rows.items():
        print(f"| {pruner} | {r['best']:.1f} (+- {r['spread']:.1f}) | {r['trial']} | {r['pruned']} | {r['steps']:,} "
              f"| {100 * r['steps'] / budget:.0f}% | {r['wall']:.0f} s |")


if __name__ == "__main__":
    main()
