"""Action masking and Dict observations: learning and speed against the peers, on the example envs.

    pip install ".[bench]"                 # stable-baselines3 and sb3-contrib
    python benchmarks/masking_dict.py      # both parts; --part masking | dict

masking: MaskedGrid-v0 (ppo_cli/example_envs.py, an 8x8 maze whose walls are masked; best return 0.81). Steps
until a deterministic evaluation reaches 0.8 (evaluated every 8,192 steps, up to --max-steps), for ppo-cli with
masks, ppo-cli without them (`env.kwargs.masked=false`: a move into a wall wastes a step) and sb3-contrib's
MaskablePPO, 3 seeds each; then the SPS of ppo-cli and MaskablePPO over --sps-steps steps.
dict: GoalReach-v0 (a Dict observation {desired_goal, observation}). ppo-cli's final 100-episode return with the
Dict and with the keys concatenated by hand (gymnasium's FlattenObservation), 3 seeds; then the SPS of ppo-cli
and SB3's PPO with MultiInputPolicy.

Every tool gets the same hyperparameters (the source defaults: 8 envs, n_steps 1024, batch 64, K 3, lr 3e-4,
clip 0.1, lambda 0.9, gamma 0.99, ent 0.01, vf 0.5, max_grad_norm 0.5, [64, 64] tanh, separate actor and
critic, orthogonal init) and one torch thread.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _common import run_ppo_cli

torch.set_num_threads(1)

SEEDS = (1, 2, 3)
HP = {"n_envs": 8, "n_steps": 1024, "batch_size": 64, "n_epochs": 3, "learning_rate": 3e-4, "clip_range": 0.1,
      "gae_lambda": 0.9, "gamma": 0.99, "ent_coef": 0.01, "vf_coef": 0.5, "max_grad_norm": 0.5}
EVERY = 8192


def _ppo_cli(env: str, seed: int, steps: int, *extra: str, stop_at: float | None = None, every: int = 0,
             episodes: int = 1):
    overrides = [f"env={env}", f"seed={seed}", f"algo.total_timesteps={steps}", f"eval.every_steps={every}",
                 f"eval.episodes={episodes}", "eval.final=true" if every == 0 else "eval.final=false",
                 "eval.objective=train", *extra]
    if stop_at is not None:
        overrides.append(f"eval.stop_at_return={stop_at}")
    return run_ppo_cli(overrides)


def _sb3_kwargs(seed: int) -> dict:
    return {"n_steps": HP["n_steps"], "batch_size": HP["batch_size"], "n_epochs": HP["n_epochs"],
            "learning_rate": HP["learning_rate"], "clip_range": HP["clip_range"], "gae_lambda": HP["gae_lambda"],
            "gamma": HP["gamma"], "ent_coef": HP["ent_coef"], "vf_coef": HP["vf_coef"],
            "max_grad_norm": HP["max_grad_norm"], "seed": seed, "device": "cpu", "verbose": 0,
            "policy_kwargs": {"net_arch": {"pi": [64, 64], "vf": [64, 64]}, "activation_fn": torch.nn.Tanh}}


def _maskable(seed: int):
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.env_util import make_vec_env

    import ppo_cli.example_envs  # noqa: F401 - registers MaskedGrid-v0

    envs = make_vec_env("MaskedGrid-v0", n_envs=HP["n_envs"], seed=seed)
    return MaskablePPO("MlpPolicy", envs, **_sb3_kwargs(seed))


def _maskable_solve_steps(seed: int, max_steps: int) -> int | None:
    import gymnasium as gym

    import ppo_cli.example_envs  # noqa: F401

    model = _maskable(seed)
    env = gym.make("MaskedGrid-v0")
    while model.num_timesteps < max_steps:
        model.learn(EVERY, reset_num_timesteps=False)
        obs, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=True, action_masks=env.unwrapped.action_masks())
            obs, r, term, trunc, _ = env.step(int(action))
            total += r
            done = term or trunc
        if total >= 0.8:
            return model.num_timesteps
    return None


def _fmt(steps: int | None, cap: int) -> str:
    return f"{steps:,}" if steps is not None else f">{cap:,}"


def masking(max_steps: int, sps_steps: int) -> None:
    print(f"MaskedGrid-v0: steps until a deterministic evaluation returns >= 0.8 (every {EVERY:,} steps, "
          f"cap {max_steps:,})")
    rows = {"ppo-cli, masked": [], "ppo-cli, no masks": [], "sb3-contrib MaskablePPO": []}
    for seed in SEEDS:
        for name, extra in (("ppo-cli, masked", ()), ("ppo-cli, no masks", ("++env.kwargs.masked=false",))):
            r = _ppo_cli("MaskedGrid-v0", seed, max_steps, *extra, stop_at=0.8, every=EVERY)
            rows[name].append(r.stopped_at[0] if r.stopped_at else None)
        rows["sb3-contrib MaskablePPO"].append(_maskable_solve_steps(seed, max_steps))
        print(f"  seed {seed}: " + ", ".join(f"{k} {_fmt(v[-1], max_steps)}" for k, v in rows.items()), flush=True)
    print("\n| tool | seed 1 | seed 2 | seed 3 |\n|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(_fmt(v, max_steps) for v in values) + " |")
    ours = _ppo_cli("MaskedGrid-v0", 1, sps_steps)
    model = _maskable(1)
    t0 = time.perf_counter()
    model.learn(sps_steps)
    theirs = model.num_timesteps / (time.perf_counter() - t0)
    print(f"\nSPS over {sps_steps:,} steps: ppo-cli {ours.sps:,.0f}, MaskablePPO {theirs:,.0f} "
          f"({ours.sps / theirs:.1f}x)\n")


def dict_obs(steps: int, sps_steps: int) -> None:
    flat = "env.wrappers=[{_target_: gymnasium.wrappers.FlattenObservation}]"
    print(f"GoalReach-v0: mean return of 100 deterministic episodes after {steps:,} steps")
    table = {"Dict": [], "keys concatenated (FlattenObservation)": []}
    for seed in SEEDS:
        for name, extra in zip(table, ((), (flat,)), strict=True):
            r = _ppo_cli("GoalReach-v0", seed, steps, *extra, episodes=100)
            table[name].append(r.final_eval.mean_return)
        print(f"  seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in table.items()), flush=True)
    print("\n| observation | seed 1 | seed 2 | seed 3 |\n|---|---|---|---|")
    for name, values in table.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import ppo_cli.example_envs  # noqa: F401

    ours = _ppo_cli("GoalReach-v0", 1, sps_steps)
    model = PPO("MultiInputPolicy", make_vec_env("GoalReach-v0", n_envs=HP["n_envs"], seed=1), **_sb3_kwargs(1))
    t0 = time.perf_counter()
    model.learn(sps_steps)
    theirs = model.num_timesteps / (time.perf_counter() - t0)
    print(f"\nSPS over {sps_steps:,} steps: ppo-cli {ours.sps:,.0f}, SB3 PPO MultiInputPolicy {theirs:,.0f} "
          f"({ours.sps / theirs:.1f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["masking", "dict", "both"], default="both")
    p.add_argument("--max-steps", type=int, default=196_608)
    p.add_argument("--dict-steps", type=int, default=131_072)
    p.add_argument("--sps-steps", type=int, default=65_536)
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; torch {torch.__version__}, one thread; numpy {np.__version__}\n")
    if args.part in ("masking", "both"):
        masking(args.max_steps, args.sps_steps)
    if args.part in ("dict", "both"):
        dict_obs(args.dict_steps, args.sps_steps)


if __name__ == "__main__":
    main()
