"""Training speed of ppo-cli against Stable-Baselines3 PPO on identical hyperparameters.

    pip install ".[bench]"
    python benchmarks/speed.py                       # settings A, B, C; 3 alternating pairs each
    python benchmarks/speed.py --settings A --pairs 5
    python benchmarks/speed.py --time-to-475         # setting A: wall time until eval >= 475, both tools
    python benchmarks/speed.py --scaling             # ppo-cli SPS against num_envs and network width
    python benchmarks/speed.py --settings A --backends gymnasium envpool   # ppo-cli on both env backends, and SB3
    python benchmarks/speed.py --settings B G --devices cuda --sb3-device cuda   # on a GPU (issue 16's table)
    python benchmarks/speed.py --settings A --devices auto cpu --pairs 1          # device=auto against the CPU
    python benchmarks/speed.py --against /tmp/before --pairs 4   # this tree's ppo-cli against another checkout's

Every measurement is a fresh subprocess (`--worker`), so peak RSS is per run and neither tool warms the
other's caches. Pairs alternate which tool goes first. Both tools get one torch thread, the same envs
(gymnasium, same ids and counts), network ([w, w] tanh, separate actor and critic, orthogonal init), epochs,
minibatch size, learning rate, clip range, GAE and loss coefficients. ppo-cli writes TensorBoard scalars every
update and a final checkpoint; SB3 writes its TensorBoard log too. `--backends gymnasium envpool` runs ppo-cli on
gymnasium's vector env and on envpool's (env.backend=envpool, pip install ".[envpool]"; envpool's own thread pool
steps the envs, at its default of one thread per CPU up to num_envs) in the same pairs; SB3 always runs on
gymnasium's envs through its DummyVecEnv. `--devices` does the same for ppo-cli's `device` (cpu, cuda, auto: each
in every pair), `--sb3-device` sets SB3's (default cpu). Setting G is sized for a GPU (issue 16's table).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_env  # noqa: E402

SETTINGS: dict[str, dict] = {
    "A": {"title": "CartPole-v1, source defaults: 8 envs, n_steps 1024, batch 64, K 3, [64, 64]",
          "env": "CartPole-v1", "num_envs": 8, "n_steps": 1024, "batch_size": 64, "K_epochs": 3, "width": 64,
          "gamma": 0.99, "gae_lambda": 0.9, "clip_range": 0.1, "ent_coef": 0.01, "steps": 163_840},
    "B": {"title": "CartPole-v1, large batch: 64 envs, n_steps 128, batch 2048, K 10, [256, 256]",
          "env": "CartPole-v1", "num_envs": 64, "n_steps": 128, "batch_size": 2048, "K_epochs": 10, "width": 256,
          "gamma": 0.99, "gae_lambda": 0.9, "clip_range": 0.1, "ent_coef": 0.01, "steps": 163_840},
    "G": {"title": "CartPole-v1, GPU-sized: 256 envs, n_steps 128, batch 8192, K 10, [512, 512]",
          "env": "CartPole-v1", "num_envs": 256, "n_steps": 128, "batch_size": 8192, "K_epochs": 10, "width": 512,
          "gamma": 0.99, "gae_lambda": 0.9, "clip_range": 0.1, "ent_coef": 0.01, "steps": 327_680},
    "C": {"title": "Pendulum-v1, continuous: 1 env, n_steps 2048, batch 64, K 10, [64, 64]",
          "env": "Pendulum-v1", "num_envs": 1, "n_steps": 2048, "batch_size": 64, "K_epochs": 10, "width": 64,
          "gamma": 0.99, "gae_lambda": 0.95, "clip_range": 0.2, "ent_coef": 0.0, "steps": 20_480},
}
LR, VF_COEF, MAX_GRAD_NORM = 3e-4, 0.5, 0.5


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- workers: one training run each, in its own process ----------------------------------------------------
def _ppo_cli_cfg(s: dict, steps: int, extra: list[str]):
    from hydra import compose, initialize_config_module

    from ppo_cli.config import register_configs

    register_configs()
    overrides = [f"env.id={s['env']}", f"env.num_envs={s['num_envs']}", f"algo.n_steps={s['n_steps']}",
                 f"algo.batch_size={s['batch_size']}", f"algo.K_epochs={s['K_epochs']}",
                 f"network.net_arch=[{s['width']},{s['width']}]", f"algo.gamma={s['gamma']}",
                 f"algo.gae_lambda={s['gae_lambda']}", f"algo.clip_range={s['clip_range']}",
                 f"algo.ent_coef={s['ent_coef']}", f"algo.lr_actor={LR}", f"algo.lr_critic={LR}",
                 f"algo.vf_coef={VF_COEF}", f"algo.max_grad_norm={MAX_GRAD_NORM}", f"algo.total_timesteps={steps}",
                 "eval.every_steps=0", "eval.final=false", "eval.objective=train", "checkpoint_interval=0",
                 "torch_threads=1", *extra]
    with initialize_config_module("ppo_cli.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def worker_ppo_cli(s: dict, steps: int, extra: list[str]) -> dict:
    return timed_training(_ppo_cli_cfg(s, steps, extra))


def timed_training(cfg: DictConfig) -> dict:
    """Train `cfg` in a throwaway folder: SPS, wall time, the trainer's seconds by stage, peak RSS."""
    from ppo_cli.run.runner import Runner

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Runner(cfg, Path(run_dir), rich_progress=False)
        t0 = time.perf_counter()
        result = trainer.run()
        wall = time.perf_counter() - t0
        trainer.close()
    return {"sps": result.global_step / wall, "steps": result.global_step, "wall": wall,
            "stages": trainer.clock.seconds, "rss_mb": _peak_rss_mb(), "stopped_at": result.stopped_at}


def _sb3_model(s: dict, log_dir: str, seed: int = 1, device: str = "cpu"):
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(1)
    env = make_vec_env(s["env"], n_envs=s["num_envs"], seed=seed)
    return PPO("MlpPolicy", env, learning_rate=LR, n_steps=s["n_steps"], batch_size=s["batch_size"],
               n_epochs=s["K_epochs"], gamma=s["gamma"], gae_lambda=s["gae_lambda"], clip_range=s["clip_range"],
               ent_coef=s["ent_coef"], vf_coef=VF_COEF, max_grad_norm=MAX_GRAD_NORM, device=device, seed=seed,
               tensorboard_log=log_dir, verbose=0,
               policy_kwargs={"net_arch": {"pi": [s["width"]] * 2, "vf": [s["width"]] * 2},
                              "activation_fn": torch.nn.Tanh})


def worker_sb3(s: dict, steps: int, device: str = "cpu") -> dict:
    with tempfile.TemporaryDirectory() as log_dir:
        model = _sb3_model(s, log_dir, device=device)
        t0 = time.perf_counter()
        model.learn(total_timesteps=steps)
        wall = time.perf_counter() - t0
    return {"sps": model.num_timesteps / wall, "steps": model.num_timesteps, "wall": wall, "rss_mb": _peak_rss_mb()}


def worker_sb3_time_to(s: dict, target: float, every: int, episodes: int, max_steps: int) -> dict:
    """SB3 until a deterministic evaluation (after each `every` steps) reaches `target`; eval time excluded."""
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    class EvalUntil(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.eval_env = make_vec_env(s["env"], n_envs=min(episodes, s["num_envs"]), seed=10_000)
            self.eval_seconds, self.reached, self.last = 0.0, None, 0

        def _on_step(self) -> bool:
            return True

        def _on_rollout_start(self) -> None:  # called after each update, before the next rollout
            if self.num_timesteps // every > self.last // every:
                self.last = self.num_timesteps
                t0 = time.perf_counter()
                mean, _ = evaluate_policy(self.model, self.eval_env, n_eval_episodes=episodes, deterministic=True)
                self.eval_seconds += time.perf_counter() - t0
                if mean >= target:
                    self.reached = (self.num_timesteps, mean)
                    self.model._stop = True

    class Stoppable(BaseCallback):  # SB3 stops learn() when a callback's on_step returns False
        def __init__(self, inner: EvalUntil) -> None:
            super().__init__()
            self.inner = inner

        def _on_step(self) -> bool:
            return not getattr(self.model, "_stop", False)

    with tempfile.TemporaryDirectory() as log_dir:
        model = _sb3_model(s, log_dir)
        cb = EvalUntil()
        t0 = time.perf_counter()
        model.learn(total_timesteps=max_steps, callback=[cb, Stoppable(cb)])
        wall = time.perf_counter() - t0 - cb.eval_seconds
    return {"reached": cb.reached, "train_seconds": wall, "eval_seconds": cb.eval_seconds, "rss_mb": _peak_rss_mb()}


def worker(args: argparse.Namespace) -> None:
    s = dict(SETTINGS[args.setting])
    if args.num_envs:
        s["num_envs"] = args.num_envs
    if args.width:
        s["width"] = args.width
    steps = args.steps or s["steps"]
    if args.worker == "ppo-cli":
        out = worker_ppo_cli(s, steps, [f"device={args.device}", *(args.extra or [])])
    elif args.worker == "ppo-cli-ttt":
        out = worker_ppo_cli(s, 500_000, ["device=cpu", f"eval.every_steps={args.every}",
                                          f"eval.episodes={args.episodes}", f"eval.stop_at_return={args.target}",
                                          *(args.extra or [])])
        out = {"reached": out["stopped_at"], "train_seconds": out["stopped_at"][1] if out["stopped_at"] else None,
               "rss_mb": out["rss_mb"]}
    elif args.worker == "sb3":
        out = worker_sb3(s, steps, args.device)
    else:
        out = worker_sb3_time_to(s, args.target, args.every, args.episodes, 500_000)
        out["train_seconds"] = out["train_seconds"] if out["reached"] else None
    print("RESULT " + json.dumps(out))


# --- the parent: alternate, repeat, print ----------------------------------------------------------------
EXTRA: list[str] = []  # --extra overrides, passed to every ppo-cli worker


def spawn(tool: str, setting: str, *opts: str, backend: str = "gymnasium", device: str = "cpu",
          tree: str | None = None) -> dict:
    """One worker run; `tree`: another checkout's ppo-cli (its own speed.py worker, its code first on the path)."""
    overrides = [*EXTRA, *([f"env.backend={backend}"] if backend != "gymnasium" else [])]
    extra = ["--extra", *overrides] if overrides and tool.startswith("ppo-cli") else []
    script = str(Path(tree) / "benchmarks" / "speed.py") if tree else __file__
    cmd = [sys.executable, script, "--worker", tool, "--setting", setting, "--device", device, *opts, *extra]
    env = child_env(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):>8,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def compare(settings: list[str], pairs: int, backends: list[str], devices: list[str] | None = None,
            sb3_device: str = "cpu", against: str | None = None) -> None:
    """Each pair runs ppo-cli once per backend and device and SB3 once, in an order that rotates from pair to
    pair."""
    devices = devices or ["cpu"]
    card = ""
    if any(d != "cpu" for d in (*devices, sb3_device)):
        import torch

        card = f"; GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "; no CUDA GPU"
    print(f"machine: {os.cpu_count()} CPUs, {_cpu_name()}{card}; torch threads 1; {pairs} alternating pairs per "
          f"setting\n")
    tools = [("ppo-cli", b, d, None) for b in backends for d in devices]
    tools += [("ppo-cli", "gymnasium", devices[0], against)] if against else []
    tools += [("sb3", "gymnasium", sb3_device, None)]

    def tool_label(t: tuple[str, str, str, str | None]) -> str:
        parts = ["SB3" if t[0] == "sb3" else "ppo-cli" if t[3] is None else f"ppo-cli@{Path(t[3]).name}"]
        if t[0] != "sb3" and len(backends) > 1:
            parts.append(t[1])
        if len({*devices, sb3_device}) > 1:
            parts.append(t[2])
        return " ".join(parts)

    label = {t: tool_label(t) for t in tools}
    rows = []
    for setting in settings:
        runs: dict[tuple[str, str, str, str | None], list[dict]] = {t: [] for t in tools}
        for i in range(pairs):
            for tool in tools[i % len(tools):] + tools[:i % len(tools)]:
                runs[tool].append(spawn(tool[0], setting, backend=tool[1], device=tool[2], tree=tool[3]))
            print(f"  {setting} pair {i + 1}: " + ", ".join(f"{label[t]} {runs[t][-1]['sps']:,.0f} SPS"
                                                        for t in tools), flush=True)
        rows.append((setting, runs))
    ours, sb3 = tools[:-1], tools[-1]
    print("\n| setting | " + " | ".join(f"{label[t]} SPS median (min-max)" for t in tools) + " | "
          + " | ".join(f"ratio {label[t]} / SB3" for t in ours) + " | peak RSS " + " / ".join(label[t] for t in tools)
          + " |")
    print("|---|" + "---|" * (2 * len(tools)))
    for name, runs in rows:
        theirs = statistics.median(r["sps"] for r in runs[sb3])
        ratios = " | ".join(f"{statistics.median(r['sps'] for r in runs[t]) / theirs:.2f}x" for t in ours)
        rss = " / ".join(f"{statistics.median(r['rss_mb'] for r in runs[t]):.0f}" for t in tools) + " MB"
        cells = " | ".join(_spread([r["sps"] for r in runs[t]]) for t in tools)
        print(f"| {name} | {cells} | {ratios} | {rss} |")
    stages = list(rows[0][1][ours[0]][0]["stages"])  # the trainer's own stage names, in its order
    print("\nppo-cli time by stage (share of training time, median over runs):")
    print("| setting | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for name, runs in rows:
        for t in ours:
            shares = [statistics.median(r["stages"][k] / r["wall"] for r in runs[t]) for k in stages]
            row = name if len(ours) == 1 else f"{name}, {label[t]}"
            print(f"| {row} | " + " | ".join(f"{100 * x:.0f}%" for x in shares) + " |")
    for name, _ in rows:
        print(f"  {name}: {SETTINGS[name]['title']}")
    if against:
        def median(runs: dict, tool: tuple) -> float:
            return statistics.median(r["sps"] for r in runs[tool])

        print(f"\nthis tree's ppo-cli against {against}'s (medians): "
              + ", ".join(f"{name} {median(runs, ours[0]) / median(runs, ours[-1]):.3f}x" for name, runs in rows))


def time_to_475(pairs: int, every: int = 8192, episodes: int = 20) -> None:
    opts = ["--every", str(every), "--episodes", str(episodes), "--target", "475"]
    print(f"\nsetting A until a deterministic {episodes}-episode evaluation reaches 475 (evaluating every {every:,} "
          f"steps, both tools; evaluation time excluded), seed 1:")
    ours, theirs = [], []
    for i in range(pairs):
        for tool in (("ppo-cli-ttt", "sb3-ttt") if i % 2 == 0 else ("sb3-ttt", "ppo-cli-ttt")):
            (ours if tool == "ppo-cli-ttt" else theirs).append(spawn(tool, "A", *opts))
    for label, runs in (("ppo-cli", ours), ("SB3", theirs)):
        cells = [f"{r['train_seconds']:.1f} s at {r['reached'][0]:,} steps" if r["train_seconds"] else "not reached"
                 for r in runs]
        print(f"  {label:8} {'; '.join(cells)}")
    ok = [r["train_seconds"] for r in ours if r["train_seconds"]], [r["train_seconds"] for r in theirs
                                                                    if r["train_seconds"]]
    if ok[0] and ok[1]:
        print(f"  ratio (ppo-cli / SB3, medians): {statistics.median(ok[0]) / statistics.median(ok[1]):.2f}")


def scaling() -> None:
    print("\nppo-cli SPS against num_envs (setting A otherwise):")
    for n in (1, 8, 32, 128):
        r = spawn("ppo-cli", "A", "--num-envs", str(n), "--steps", str(max(65_536, 1024 * n)))
        print(f"  num_envs {n:>4}: {r['sps']:>8,.0f} SPS  " + _stage_line(r))
    print("ppo-cli SPS against network width (setting A otherwise):")
    for w in (64, 256, 1024):
        r = spawn("ppo-cli", "A", "--width", str(w), "--steps", "65536")
        print(f"  width {w:>5}: {r['sps']:>8,.0f} SPS  " + _stage_line(r))


def _stage_line(r: dict) -> str:
    return " ".join(f"{k} {100 * v / r['wall']:.0f}%" for k, v in r["stages"].items())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=["A", "B", "C"], choices=sorted(SETTINGS))
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--time-to-475", action="store_true", help="also time setting A until eval >= 475")
    p.add_argument("--scaling", action="store_true", help="ppo-cli SPS against num_envs and width, then exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--setting", default="A", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--num-envs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, help=argparse.SUPPRESS)
    p.add_argument("--every", type=int, default=8192, help=argparse.SUPPRESS)
    p.add_argument("--episodes", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, default=475.0, help=argparse.SUPPRESS)
    p.add_argument("--extra", nargs="*", help="extra ppo-cli overrides for every ppo-cli run")
    p.add_argument("--backends", nargs="+", default=["gymnasium"], choices=["gymnasium", "envpool"],
                   help="ppo-cli's env backends to run, each in every pair (default: gymnasium)")
    p.add_argument("--devices", nargs="+", default=["cpu"], choices=["cpu", "cuda", "auto"],
                   help="ppo-cli's devices to run, each in every pair (default: cpu)")
    p.add_argument("--sb3-device", default="cpu", choices=["cpu", "cuda"], help="SB3's device (default: cpu)")
    p.add_argument("--against", metavar="TREE", help="also run the ppo-cli of another checkout (a git worktree of "
                   "an earlier commit, say) in every pair, and print this tree's SPS over its")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = p.parse_args()
    EXTRA.extend(args.extra or [])
    if args.worker:
        worker(args)
        return
    if not args.scaling:
        try:
            import stable_baselines3  # noqa: F401
        except ImportError:
            raise SystemExit("speed.py compares against Stable-Baselines3: pip install '.[bench]'") from None
        if "envpool" in args.backends and importlib.util.find_spec("envpool") is None:
            raise SystemExit("--backends envpool needs envpool: pip install '.[envpool]'")
    if args.scaling:
        scaling()
    else:
        compare(args.settings, args.pairs, args.backends, args.devices, args.sb3_device, args.against)
        if args.time_to_475:
            time_to_475(args.pairs)


if __name__ == "__main__":
    main()
