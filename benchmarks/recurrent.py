"""Recurrent policies on a task that needs memory: CartPoleNoVel-v1 (CartPole without its velocities).

    pip install ".[bench]"             # sb3-contrib's RecurrentPPO
    python benchmarks/recurrent.py     # 3 seeds; --seeds 1 for a quick look

For each seed: steps until a deterministic 20-episode evaluation (every --every steps) reaches 475, for ppo-cli
with `algo=ppo_lstm`, the same run with the MLP (`network.recurrent=null`: its best evaluation is printed, the
test being that it stays low), and sb3-contrib's RecurrentPPO with the same settings (RL Zoo's for this task:
8 envs, n_steps 32, batch 256, 20 epochs, lr 1e-3 linear to 0, clip 0.2, gamma 0.98, lambda 0.8, no entropy
bonus, LSTM of 64 with a separate critic LSTM, a [64] ReLU layer, observation and reward normalization). Then
the SPS of both tools over --sps-steps steps without evaluation. One torch thread each.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _common import run_ppo_cli

torch.set_num_threads(1)
TARGET = 475.0


def ppo_cli(seed: int, steps: int, every: int, *extra: str):
    return run_ppo_cli(["env=CartPoleNoVel-v1", "algo=ppo_lstm", f"seed={seed}", f"algo.total_timesteps={steps}",
                        f"eval.every_steps={every}", "eval.episodes=20", f"eval.stop_at_return={TARGET}",
                        "eval.final=false", "eval.objective=best", *extra])


def recurrent_ppo(seed: int):
    import gymnasium as gym
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from ppo_cli.wrappers import KeepObservationIndices

    def wrap(env: gym.Env) -> gym.Env:
        return KeepObservationIndices(env, [0, 2])

    envs = VecNormalize(make_vec_env("CartPole-v1", n_envs=8, seed=seed, wrapper_class=wrap), gamma=0.98)
    return RecurrentPPO(
        "MlpLstmPolicy", envs, n_steps=32, batch_size=256, n_epochs=20, learning_rate=lambda p: 1e-3 * p,
        clip_range=0.2, gamma=0.98, gae_lambda=0.8, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=seed,
        device="cpu", verbose=0,
        policy_kwargs={"lstm_hidden_size": 64, "enable_critic_lstm": True, "net_arch": {"pi": [64], "vf": [64]},
                       "activation_fn": torch.nn.ReLU})


def _evaluate_sb3(model, seed: int) -> float:
    import gymnasium as gym

    from ppo_cli.wrappers import KeepObservationIndices

    norm = model.get_env()
    env = KeepObservationIndices(gym.make("CartPole-v1"), [0, 2])
    returns = []
    for episode in range(20):
        obs, _ = env.reset(seed=10_000 + seed + episode)
        state, start, total, done = None, np.ones(1, dtype=bool), 0.0, False
        while not done:
            action, state = model.predict(norm.normalize_obs(obs[None]), state=state, episode_start=start,
                                          deterministic=True)
            obs, r, term, trunc, _ = env.step(int(action[0]))
            start = np.zeros(1, dtype=bool)
            total += r
            done = term or trunc
        returns.append(total)
    return float(np.mean(returns))


def recurrent_ppo_steps(seed: int, steps: int, every: int) -> tuple[int | None, float]:
    model = recurrent_ppo(seed)
    best = -np.inf
    while model.num_timesteps < steps:
        model.learn(every, reset_num_timesteps=False)
        score = _evaluate_sb3(model, seed)
        best = max(best, score)
        if score >= TARGET:
            return model.num_timesteps, best
    return None, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=200_000)
    p.add_argument("--every", type=int, default=10_240)
    p.add_argument("--sps-steps", type=int, default=51_200)
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; torch {torch.__version__}, one thread\n")
    fmt = lambda s: f"{s:,}" if s is not None else f">{args.steps:,}"  # noqa: E731
    rows = []
    for seed in args.seeds:
        lstm = ppo_cli(seed, args.steps, args.every)
        mlp = ppo_cli(seed, args.steps, args.every, "network.recurrent=null")
        sb3_steps, sb3_best = recurrent_ppo_steps(seed, args.steps, args.every)
        row = (seed, lstm.stopped_at[0] if lstm.stopped_at else None, lstm.best_eval["mean_return"],
               mlp.best_eval["mean_return"], sb3_steps, sb3_best)
        rows.append(row)
        print(f"  seed {seed}: ppo-cli lstm {fmt(row[1])} steps (best {row[2]:.1f}), mlp best {row[3]:.1f}, "
              f"RecurrentPPO {fmt(row[4])} steps (best {row[5]:.1f})", flush=True)
    print(f"\nsteps until a 20-episode deterministic evaluation >= {TARGET:.0f} (every {args.every:,} steps)\n")
    print("| seed | ppo-cli lstm | ppo-cli mlp (best eval) | RecurrentPPO |\n|---|---|---|---|")
    for seed, steps, _, mlp_best, sb3_steps, _ in rows:
        print(f"| {seed} | {fmt(steps)} | {mlp_best:.1f} | {fmt(sb3_steps)} |")
    ours = run_ppo_cli(["env=CartPoleNoVel-v1", "algo=ppo_lstm", f"algo.total_timesteps={args.sps_steps}",
                        "eval.every_steps=0", "eval.final=false", "eval.objective=train"])
    model = recurrent_ppo(1)
    t0 = time.perf_counter()
    model.learn(args.sps_steps)
    theirs = model.num_timesteps / (time.perf_counter() - t0)
    print(f"\nSPS over {args.sps_steps:,} steps: ppo-cli {ours.sps:,.0f}, RecurrentPPO {theirs:,.0f} "
          f"({ours.sps / theirs:.1f}x)")


if __name__ == "__main__":
    main()
