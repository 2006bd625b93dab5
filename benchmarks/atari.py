"""Atari training speed: ppo-cli (`env=Breakout network=cnn algo=ppo_atari`) against Stable-Baselines3's PPO
(CnnPolicy, its AtariWrapper, VecFrameStack 4) on the same hyperparameters.

    pip install ".[bench,atari]"
    python benchmarks/atari.py                      # 20,480 steps each, one torch thread, one run each
    python benchmarks/atari.py --steps 40960 --threads 2 --pairs 2
    python benchmarks/atari.py --bf16               # also ppo-cli with network.precision=bfloat16
    python benchmarks/atari.py --device cuda --envpool --bf16   # on a GPU: also envpool's envs, and bfloat16

Both tools run from one description, ppo-cli's composed config (SB3's side is built from it by
`_common.sb3_atari_ppo`): ALE/Breakout-v5 with frameskip 1 at the emulator, sticky actions 0.25 (the v5 default;
ppo-cli's `env.atari` keeps it), the minimal action set; up to 30 no-ops at reset, frame skip 4 with max-pooling,
84x84 grayscale, 4 stacked frames, episodic life, FIRE on reset, rewards clipped to their sign; 8 envs x 128
steps, 4 epochs of 256-sample minibatches, learning rate 2.5e-4 decaying linearly to 0, clip 0.1, entropy 0.01,
value 0.5, gamma 0.99, lambda 0.95, gradient clip 0.5; the Nature CNN with one trunk for actor and critic, images
scaled to [0, 1] in the network. No evaluation during training; ppo-cli writes TensorBoard scalars every update
and a final checkpoint, SB3 its TensorBoard log. Every run is a fresh subprocess (peak RSS is per run); pairs
alternate which tool goes first. `--device` is both tools' device; `--envpool` adds ppo-cli on envpool's C++ envs
(env.backend=envpool, pip install ".[envpool]"), the setting LeanRL's published Atari figures use.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atari_overrides, child_env, compose, sb3_atari_ppo  # noqa: E402
from speed import _cpu_name, _peak_rss_mb, timed_training  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GAME = "Breakout"


def _cfg(steps: int, threads: int, device: str, *extra: str) -> DictConfig:
    return compose([*atari_overrides(GAME), f"algo.total_timesteps={steps}", "eval.every_steps=0", "eval.final=false",
                    "eval.objective=train", "checkpoint_interval=0", f"device={device}", f"torch_threads={threads}",
                    *extra])


# The runs a comparison can have: ppo-cli's overrides by name (SB3 is the peer).
PPO_CLI = {"ppo-cli": [], "ppo-cli bf16": ["network.precision=bfloat16"], "ppo-cli envpool": ["env.backend=envpool"],
           "ppo-cli envpool bf16": ["env.backend=envpool", "network.precision=bfloat16"]}


def worker_ppo_cli(steps: int, threads: int, device: str, tool: str) -> dict:
    return timed_training(_cfg(steps, threads, device, *PPO_CLI[tool]))


def worker_sb3(steps: int, threads: int, device: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as log_dir:
        model = sb3_atari_ppo(_cfg(steps, threads, device), device=device, tensorboard_log=log_dir)
        t0 = time.perf_counter()
        model.learn(total_timesteps=steps)
        wall = time.perf_counter() - t0
    return {"sps": model.num_timesteps / wall, "steps": model.num_timesteps, "wall": wall, "rss_mb": _peak_rss_mb()}


def spawn(tool: str, steps: int, threads: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, "--steps", str(steps), "--threads", str(threads),
           "--device", device]
    env = child_env(OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20_480, help="env steps per run (default 20,480: 20 updates)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both (default 1)")
    p.add_argument("--pairs", type=int, default=1, help="runs of each tool, alternating which goes first")
    p.add_argument("--bf16", action="store_true", help="also run ppo-cli with network.precision=bfloat16")
    p.add_argument("--envpool", action="store_true", help="also run ppo-cli on envpool's envs (env.backend=envpool)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="both tools' device (default cpu)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        out = (worker_sb3(args.steps, args.threads, args.device) if args.worker == "sb3"
               else worker_ppo_cli(args.steps, args.threads, args.device, args.worker))
        print("RESULT " + json.dumps(out))
        return
    try:
        import ale_py  # noqa: F401
        import stable_baselines3  # noqa: F401
    except ImportError:
        raise SystemExit("atari.py needs SB3 and ale-py: pip install '.[bench,atari]'") from None
    if args.envpool and importlib.util.find_spec("envpool") is None:
        raise SystemExit("--envpool needs envpool: pip install '.[envpool]'")
    card = ""
    if args.device == "cuda":
        import torch

        card = f"; GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no CUDA GPU"
    print(f"machine: {os.cpu_count()} CPUs, {_cpu_name()}{card}; device {args.device}; torch threads {args.threads}; "
          f"ALE/{GAME}-v5, {args.steps:,} steps per run, {args.pairs} pair(s)\n", flush=True)
    tools = [t for t in PPO_CLI if ("bf16" not in t or args.bf16) and ("envpool" not in t or args.envpool)]
    tools.append("sb3")
    runs: dict[str, list[dict]] = {tool: [] for tool in tools}
    for i in range(args.pairs):
        for tool in tools[i % len(tools):] + tools[:i % len(tools)]:  # each pair rotates which goes first
            runs[tool].append(spawn(tool, args.steps, args.threads, args.device))
        print(f"  pair {i + 1}: " + ", ".join(f"{_name(t)} {runs[t][-1]['sps']:,.0f} SPS" for t in tools), flush=True)
    sps = {tool: statistics.median(r["sps"] for r in rs) for tool, rs in runs.items()}
    print("\n| tool | SPS (median) | peak RSS |")
    print("|---|---|---|")
    for tool, rs in runs.items():
        print(f"| {_name(tool)} | {sps[tool]:,.0f} | {statistics.median(r['rss_mb'] for r in rs):,.0f} MB |")
    print()
    for tool in tools[:-1]:
        ours = runs[tool]
        print(f"ratio {_name(tool)} / SB3: {sps[tool] / sps['sb3']:.2f}x")
        print(f"  {_name(tool)} time by stage (share of training time, median): " + ", ".join(
            f"{k} {100 * statistics.median(r['stages'][k] / r['wall'] for r in ours):.0f}%" for k in ours[0]["stages"]))


def _name(tool: str) -> str:
    return {"sb3": "SB3"}.get(tool, tool.replace("bf16", "network.precision=bfloat16"))

if __name__ == "__main__":
    main()
