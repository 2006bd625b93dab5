"""Scaling one run across processes: torchrun with 1 and 2 ranks, the same settings per rank.

    pip install ".[box2d]"
    python benchmarks/distributed.py                    # LunarLander-v3: SPS, then learning for 3 seeds
    python benchmarks/distributed.py --seeds 1 --learn-steps 100000

SPS: each rank runs `env.num_envs` envs and its own rollout and minibatches; 2 ranks do twice the steps per
update, so on an env-bound task the SPS should nearly double when each rank has a core. Learning: the same
total steps (algo.total_timesteps counts all ranks' steps), final deterministic evaluation over 20 episodes.
One torch thread per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Per rank: 16 envs x 256 steps, minibatches of 1024 (16 minibatch steps an update, each one all-reduce: on the
# 2-core development VM a gloo all-reduce between two processes takes about 1.3 ms whatever its size), and
# RL Zoo's LunarLander discounting (gamma 0.999, lambda 0.98).
COMMON = ["env=LunarLander-v3", "env.num_envs=16", "algo.n_steps=256", "algo.batch_size=1024", "algo.K_epochs=4",
          "algo.gamma=0.999", "algo.gae_lambda=0.98", "algo.clip_range=0.2", "algo.lr_schedule=linear",
          "torch_threads=1", "checkpoint_interval=0"]

# Learning: RL Zoo's PPO settings for LunarLander (per rank: 16 envs x 1024 steps, minibatches of 64, 4 epochs,
# entropy 0.01), which learn in about 1M steps on one process; the SPS settings above take too few gradient steps.
LEARN = ["algo.n_steps=1024", "algo.batch_size=64", "algo.clip_range=0.2", "algo.lr_schedule=constant",
         "algo.ent_coef=0.01"]


def run(nproc: int, *overrides: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ppo_cli.cli.train", *COMMON, *overrides, f"hydra.run.dir={d}/run"]
        env = child_env(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(d) / "run" / "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--sps-steps", type=int, default=131_072)
    p.add_argument("--learn-steps", type=int, default=500_000)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--skip-sps", action="store_true")
    p.add_argument("--split", action="store_true", help="learning: 2 ranks of 8 envs and minibatches of 32")
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; LunarLander-v3, 16 envs x 256 steps per rank\n")
    sps: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(0 if args.skip_sps else args.pairs):
        for n in (1, 2):
            r = run(n, f"algo.total_timesteps={args.sps_steps}", "eval.every_steps=0", "eval.final=false",
                    "eval.objective=train")
            sps[n].append(r["sps"])
            print(f"  {n} rank(s): {r['sps']:,.0f} SPS", flush=True)
    if sps[1]:
        one, two = statistics.median(sps[1]), statistics.median(sps[2])
        print(f"\nSPS, median of {args.pairs}: 1 rank {one:,.0f}, 2 ranks {two:,.0f} ({two / one:.2f}x)\n")
    rows = []
    for seed in args.seeds:
        # --split: the 2 ranks share the single process's 16 envs and 64-sample minibatches (8 envs and 32 each),
        # so both take the same gradient steps on the same amount of data per update.
        split = {1: [], 2: ["env.num_envs=8", "algo.batch_size=32"] if args.split else []}
        scores = [run(n, *LEARN, *split[n], f"seed={seed}", f"algo.total_timesteps={args.learn_steps}",
                      "eval.every_steps=0", "eval.episodes=20")["final_eval"]["mean_return"] for n in (1, 2)]
        rows.append((seed, *scores))
        print(f"  seed {seed}: 1 rank {scores[0]:.1f}, 2 ranks {scores[1]:.1f}", flush=True)
    layout = "2 ranks x 8 envs, minibatch 32 each" if args.split else "the same per-rank settings"
    print(f"\nfinal 20-episode evaluation after {args.learn_steps:,} steps ({layout})\n")
    print("| seed | 1 rank | 2 ranks |\n|---|---|---|")
    for seed, a, b in rows:
        print(f"| {seed} | {a:.1f} | {b:.1f} |")


if __name__ == "__main__":
    main()
