"""IPPO / MAPPO on PettingZoo's MPE simple_spread: ppo-cli against BenchMARL at equal frames, in one invocation.

    python benchmarks/multiagent.py --frames 60000 --seeds 1 2                      # ppo-cli alone
    python benchmarks/multiagent.py --frames 60000 --seeds 1 2 --benchmarl /tmp/bm/bin/python

BenchMARL runs in a Python of its own (`--benchmarl`: an interpreter with `pip install benchmarl mpe2`; its TorchRL
imports `pettingzoo.mpe`, which PettingZoo 1.27 moved to the mpe2 package, so the child aliases that module). Both
tools train on the same task settings (BenchMARL's simple_spread: 3 agents, 100 steps an episode, continuous actions,
local_ratio 0.5) with BenchMARL's on-policy defaults where ppo-cli has the same knob: 10 envs x 600 steps = 6,000
frames a batch, 45 minibatch steps of 400 frames (ppo-cli: 3 epochs of 15 minibatches of 1,200 agent samples),
learning rate 5e-5, gamma 0.99, lambda 0.9, clip 0.2, no entropy bonus, a critic coefficient of 1, gradient norm
clipped at 5, [256, 256] tanh MLPs; parameters shared by the agents. Where the tools differ: BenchMARL's actor is a
tanh-squashed Gaussian, ppo-cli's a Gaussian clipped to the action bounds; ppo-cli normalizes advantages per
minibatch.

Printed per tool, algorithm and seed: the per-agent training return (the mean over the agents of their episode
returns, averaged over the episodes of the last batch: BenchMARL's `mean_return`, ppo-cli's team return / 3 over its
last 60 episodes) and frames per second over the whole run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, child_env  # noqa: E402

AGENTS = 3
PPO_CLI = ["env=simple_spread_v3", "env.num_envs=10", "algo.n_steps=600", "algo.batch_size=1200", "algo.K_epochs=3",
           "algo.lr_actor=5e-5", "algo.lr_critic=5e-5", "algo.gamma=0.99", "algo.gae_lambda=0.9",
           "algo.clip_range=0.2", "algo.ent_coef=0.0", "algo.vf_coef=1.0", "algo.max_grad_norm=5.0",
           "network.net_arch=[256,256]", "eval.every_steps=0", "eval.final=false", "eval.objective=train",
           "eval.train_window=60", "checkpoint_interval=0", "log_interval=1000"]

BENCHMARL_CHILD = r'''
import importlib, json, sys, time
import mpe2
sys.modules["pettingzoo.mpe"] = mpe2  # TorchRL 0.11 imports the MPE envs from their old home
for name in ("simple_spread_v3",):
    sys.modules[f"pettingzoo.mpe.{name}"] = importlib.import_module(f"mpe2.{name}")
from benchmarl.algorithms import IppoConfig, MappoConfig
from benchmarl.environments import PettingZooTask
from benchmarl.experiment import Experiment, ExperimentConfig
from benchmarl.models.mlp import MlpConfig

algo, frames, seed, folder = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = ExperimentConfig.get_from_yaml()
cfg.max_n_frames, cfg.loggers, cfg.evaluation, cfg.render = frames, [], False, False
cfg.create_json, cfg.checkpoint_at_end, cfg.save_folder = False, False, folder
config = (MappoConfig if algo == "mappo" else IppoConfig).get_from_yaml()
experiment = Experiment(task=PettingZooTask.SIMPLE_SPREAD.get_from_yaml(), algorithm_config=config,
                        model_config=MlpConfig.get_from_yaml(), critic_model_config=MlpConfig.get_from_yaml(),
                        seed=seed, config=cfg)
started = time.perf_counter()
experiment.run()
print(json.dumps({"return": float(experiment.mean_return), "frames": int(experiment.total_frames),
                  "wall": time.perf_counter() - started}))
'''


def ppo_cli(algo: str, frames: int, seed: int, work: Path) -> dict:
    folder = work / f"ppo-cli-{algo}-{seed}"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ppo_cli.cli.train", f"algo={algo}", *PPO_CLI, f"seed={seed}",
                           f"algo.total_timesteps={frames}", f"hydra.run.dir={folder}"], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"ppo-train failed:\n{proc.stderr}")
    result = json.loads((folder / "result.json").read_text())
    return {"return": result["recent_train_return"] / AGENTS, "frames": result["global_step"], "wall": wall}


def benchmarl(python: str, algo: str, frames: int, seed: int, work: Path) -> dict:
    folder = work / f"benchmarl-{algo}-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    script = work / "benchmarl_child.py"
    script.write_text(BENCHMARL_CHILD)
    started = time.perf_counter()
    proc = subprocess.run([python, str(script), algo, str(frames), str(seed), str(folder)], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"BenchMARL failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = time.perf_counter() - started  # the process as a whole, as for ppo-train
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--algos", nargs="+", choices=["mappo", "ippo"], default=["mappo", "ippo"])
    parser.add_argument("--benchmarl", metavar="PYTHON", help="an interpreter with benchmarl and mpe2 installed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"simple_spread_v3, {args.frames:,} frames per run; per-agent training return, frames per second")
        print(f"{'tool':10} {'algo':6} {'seed':>4} {'return':>9} {'frames/s':>9} {'wall s':>8}")
        for algo in args.algos:
            for seed in args.seeds:
                runs = [("ppo-cli", ppo_cli(algo, args.frames, seed, work))]
                if args.benchmarl:
                    runs.append(("BenchMARL", benchmarl(args.benchmarl, algo, args.frames, seed, work)))
                for tool, r in runs:
                    print(f"{tool:10} {algo:6} {seed:>4} {r['return']:9.2f} {r['frames'] / r['wall']:9.0f} "
                          f"{r['wall']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
