"""Truncated back-propagation through time (`algo.seq_len`) against sb3-contrib's RecurrentPPO, on a task that
needs memory: PendulumNoVel-v1 (Pendulum without its angular velocity), with RL Zoo's recurrent settings.

    pip install ".[bench]"                    # sb3-contrib's RecurrentPPO
    python benchmarks/recurrent_chunks.py     # 2 seeds, 100k steps each; --seeds 1 2 3, --steps N

Both tools: 4 envs x 1024 steps, minibatches of 256 samples, 10 epochs, lr 1e-3, gamma 0.9, lambda 0.95, clip
0.2, no entropy bonus, value coefficient 0.5, gradient clip 0.5, an LSTM of 64 with a separate critic LSTM and a
[64] ReLU layer, no normalization (RL Zoo's PendulumNoVel-v1 entry, without its gSDE, which ppo-cli does not
have). ppo-cli: `env=PendulumNoVel-v1 algo=ppo_lstm_pendulum`, sequences of `--seq-len` steps (64: 4 per
minibatch). RecurrentPPO cuts its minibatches of 256 consecutive samples into sequences at episode starts and pads
them. Each run ends with the same evaluation: 20 deterministic episodes on seeds 10000 + seed + i (random policy:
about -1200; the full-state Pendulum solved: about -150 to -200). Then the SPS of both over the same steps
(training only), one torch thread each.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from _common import run_ppo_cli

torch.set_num_threads(1)


def ppo_cli(seed: int, steps: int, seq_len: int):
    return run_ppo_cli(["env=PendulumNoVel-v1", "algo=ppo_lstm_pendulum", f"algo.seq_len={seq_len}", f"seed={seed}",
                        f"algo.total_timesteps={steps}", "eval.every_steps=0", "eval.episodes=20"])


def recurrent_ppo(seed: int):
    import gymnasium as gym
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    from ppo_cli.wrappers import KeepObservationIndices

    def wrap(env: gym.Env) -> gym.Env:
        return KeepObservationIndices(env, [0, 1])

    envs = make_vec_env("Pendulum-v1", n_envs=4, seed=seed, wrapper_class=wrap)
    return RecurrentPPO(
        "MlpLstmPolicy", envs, n_steps=1024, batch_size=256, n_epochs=10, learning_rate=1e-3, clip_range=0.2,
        gamma=0.9, gae_lambda=0.95, ent_coef=0.0, vf_coef=0.5, max_grad_norm=0.5, seed=seed, device="cpu", verbose=0,
        policy_kwargs={"lstm_hidden_size": 64, "enable_critic_lstm": True, "net_arch": {"pi": [64], "vf": [64]},
                       "activation_fn": torch.nn.ReLU})


def evaluate_sb3(model, seed: int, episodes: int = 20) -> float:
    import gymnasium as gym

    from ppo_cli.wrappers import KeepObservationIndices

    env = KeepObservationIndices(gym.make("Pendulum-v1"), [0, 1])
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=10_000 + seed + episode)
        state, start, total, done = None, np.ones(1, dtype=bool), 0.0, False
        while not done:
            action, state = model.predict(obs[None], state=state, episode_start=start, deterministic=True)
            obs, r, term, trunc, _ = env.step(action[0])
            start = np.zeros(1, dtype=bool)
            total += float(r)
            done = term or trunc
        returns.append(total)
    return float(np.mean(returns))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=102_400)
    p.add_argument("--seq-len", type=int, default=64)
    args = p.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; torch {torch.__version__}, one thread; {args.steps:,} steps, "
          f"ppo-cli algo.seq_len={args.seq_len}\n", flush=True)
    rows = []
    for seed in args.seeds:
        ours = ppo_cli(seed, args.steps, args.seq_len)
        model = recurrent_ppo(seed)
        t0 = time.perf_counter()
        model.learn(args.steps)
        theirs_sps = model.num_timesteps / (time.perf_counter() - t0)
        theirs = evaluate_sb3(model, seed)
        rows.append((seed, ours.final_eval.mean_return, theirs, ours.sps, theirs_sps))
        print(f"  seed {seed}: ppo-cli {rows[-1][1]:.1f} ({ours.sps:,.0f} SPS), RecurrentPPO {theirs:.1f} "
              f"({theirs_sps:,.0f} SPS)", flush=True)
    print("\n| seed | ppo-cli return | RecurrentPPO return | ppo-cli SPS | RecurrentPPO SPS | SPS ratio |")
    print("|---|---|---|---|---|---|")
    for seed, ours, theirs, ours_sps, theirs_sps in rows:
        print(f"| {seed} | {ours:.1f} | {theirs:.1f} | {ours_sps:,.0f} | {theirs_sps:,.0f} | "
              f"{ours_sps / theirs_sps:.1f}x |")
    print(f"| mean | {np.mean([r[1] for r in rows]):.1f} | {np.mean([r[2] for r in rows]):.1f} | | | |")


if __name__ == "__main__":
    main()
