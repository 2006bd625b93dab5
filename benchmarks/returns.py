"""Learning benchmarks: train tasks with their presets and print the evaluated return against steps.

    python benchmarks/returns.py                          # Pendulum-v1 and HalfCheetah-v5
    python benchmarks/returns.py --tasks hopper --seeds 1 2
    python benchmarks/returns.py --tasks pendulum --steps 200000
    python benchmarks/returns.py --tasks breakout pong --peer sb3      # Atari: ppo-cli and SB3, curves side by side
    python benchmarks/returns.py --tasks breakout --peer sb3 --parallel   # both tools at once, on 2+ cores
    python benchmarks/returns.py --tasks beamrider --steps 1000000 --every 100000 --episodes 10

Each ppo-cli run is a plain `ppo-train` with the preset's overrides (printed, so any row can be rerun by hand),
evaluating deterministically every --every steps on separate envs. The table is read back from the run's
TensorBoard events (eval/mean_return) and its result.json. MuJoCo tasks need `pip install '.[mujoco]'`.

Atari tasks (`pip install '.[atari]'`): `breakout`, `pong`, or any preset in conf/env/ with `atari: true`, named in
lower case (beamrider, spaceinvaders, ...): `env=<Game> network=cnn algo=ppo_atari`, 1M steps by default with an
evaluation every 100k. Evaluation scores are whole games (all lives) with their unclipped scores, FIRE pressed at
the start of each life (docs/pixels.md), and every evaluation game is cut at 27,000 agent steps (108,000 frames,
the ALE's own limit for the v5 ids; `eval.max_episode_steps`), so a policy that never loses cannot hang a run.
The 10M-step scores CleanRL published for `ppo_atari` (Pong 20.4, Breakout 415, BeamRider 1916) are printed as
the anchor of each game that has one.

`--peer sb3` (Atari tasks; `pip install '.[bench,atari]'`): after each ppo-cli run, Stable-Baselines3's PPO trains
on the same task in a process of its own, built by `_common.sb3_atari_ppo` from the same composed ppo-cli config
(so game, ALE settings, env count, seed and hyperparameters are one description): its `make_atari_env`
(AtariWrapper) + VecFrameStack 4, CnnPolicy, the same step budget, device and torch threads.

How SB3 is evaluated, and why this way: by ppo-cli's own evaluation code, not SB3's `evaluate_policy`. A callback
evaluates after the update that crosses each multiple of --every, which is where ppo-cli's PeriodicEvaluator
evaluates (both tools advance n_steps x num_envs steps per update, so the steps are the same), and once more at
the end where the last update did not cross one. It plays the episodes with `ppo_cli.run.evaluation.run_episodes`
on envs from ppo-cli's env factory `make_vec_env`, built as PeriodicEvaluator builds them (seeds seed +
EVAL_SEED_OFFSET, min(episodes, num_envs) envs, the same step cap), acting with SB3's deterministic action
(`model.predict(..., deterministic=True)`). So both tools are scored by one protocol: the same games, seeds,
per-env episode quotas, cap and scoring. SB3's own route would differ on each point: its AtariWrapper ends an
episode at each lost life, clips rewards, and presses FIRE only at reset (a deterministic policy can then wait
out the game), so its evaluation needs a different wrapper stack, which would be a second copy of the protocol.
Both sides see the same observations: ppo-cli's pipeline (gymnasium's AtariPreprocessing + FrameStackObservation)
gives frames, rewards and episode ends identical to SB3's AtariWrapper + VecFrameStack for the same seed and
actions (tests/test_bench_returns.py), stacked oldest first as [4, 84, 84], the layout SB3's policy reads after
its VecTransposeImage. One difference remains, in the first 3 steps of a game: a fresh stack repeats the first
frame in ppo-cli (FrameStackObservation's padding, as CleanRL's) where SB3's VecFrameStack pads with zeros, so
SB3's policy meets at evaluation a padding it did not train on, for 3 of the hundreds of steps of each game.

The final table also gives each run's mean score over its last 100 training episodes (sampled actions; for Atari
whole games with raw scores on both sides: ppo-cli's recent_train_return, SB3's Monitor, which sits below its
AtariWrapper). Early in Atari training a deterministic policy is often one fixed action, which a few evaluation
games score alike whatever the network; the training games are the steadier signal there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, atari_overrides, child_env, compose, sb3_atari_ppo  # noqa: E402

# name: (overrides, default steps, default eval interval, target return to report against)
TASKS: dict[str, tuple[list[str], int, int, float]] = {
    "pendulum": (["env=Pendulum-v1", "algo=ppo_pendulum"], 500_000, 20_480, -250.0),
    "halfcheetah": (["env=HalfCheetah-v5", "algo=ppo_mujoco"], 1_000_000, 51_200, 1500.0),
    "hopper": (["env=Hopper-v5", "algo=ppo_mujoco"], 1_000_000, 51_200, 2000.0),
    "walker2d": (["env=Walker2d-v5", "algo=ppo_mujoco"], 1_000_000, 51_200, 2000.0),
    "lunarlander-continuous": (["env=LunarLanderContinuous-v3", "algo=ppo_mujoco"], 1_000_000, 51_200, 200.0),
}
ATARI_STEPS, ATARI_EVERY = 1_000_000, 100_000
ATARI_EVAL_CAP = 27_000  # agent steps per evaluation game: the ALE's 108,000 frames at frame skip 4
# CleanRL's ppo_atari at 10M steps (published; NoFrameskip-v4, no sticky actions): anchors, not targets for 1M.
CLEANRL_10M = {"Pong": 20.4, "Breakout": 415.0, "BeamRider": 1916.0}
PEERS = ("sb3",)


@dataclass
class Task:
    name: str
    overrides: list[str]
    steps: int
    every: int
    target: float | None
    atari: bool = False
    target_label: str = field(default="")


def atari_presets() -> dict[str, str]:
    """The Atari presets of conf/env/ by lower-case name: {"breakout": "Breakout", ...}."""
    folder = ROOT / "ppo_cli" / "conf" / "env"
    return {p.stem.lower(): p.stem for p in sorted(folder.glob("*.yaml")) if OmegaConf.load(p).get("atari")}


def resolve(name: str) -> Task | None:
    if name in TASKS:
        overrides, steps, every, target = TASKS[name]
        return Task(name, overrides, steps, every, target, target_label=f"{target:g}")
    game = atari_presets().get(name)
    if game is None:
        return None
    anchor = CLEANRL_10M.get(game)
    label = f"{anchor:g} (CleanRL, 10M)" if anchor is not None else "-"
    return Task(name, [*atari_overrides(game), f"eval.max_episode_steps={ATARI_EVAL_CAP}"], ATARI_STEPS, ATARI_EVERY,
                anchor, atari=True, target_label=label)


def overrides_for(task: Task, seed: int, steps: int, every: int, episodes: int, device: str,
                  threads: int) -> list[str]:
    """The config both tools run from (ppo-train's command line, without the run folder)."""
    return [*task.overrides, f"seed={seed}", f"algo.total_timesteps={steps}", f"eval.every_steps={every}",
            f"eval.episodes={episodes}", f"device={device}", f"torch_threads={threads}"]


def _stream(cmd: list[str], env: dict[str, str], prefix: str, keep: str) -> tuple[int, list[str], str]:
    """Run `cmd`, echoing the stdout lines that contain `keep` as they come; (exit code, stdout lines, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    assert proc.stdout is not None and proc.stderr is not None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if keep in line:
            print(f"  [{prefix}] {line.strip()}", flush=True)
    stderr = proc.stderr.read()
    return proc.wait(), lines, stderr


def _env(threads: int) -> dict[str, str]:
    return child_env(OMP_NUM_THREADS=str(threads))


def _last_line(stderr: str, code: int) -> str:
    return stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {code}"


def run_ppo_cli(task: Task, seed: int, overrides: list[str], threads: int, out: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = out / f"{task.name}-seed{seed}"
    if run_dir.exists():  # a previous benchmark's events would mix into this run's curve
        shutil.rmtree(run_dir)
    args = [*overrides, f"hydra.run.dir={run_dir}"]
    print(f"$ ppo-train {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    code, _, stderr = _stream([sys.executable, "-m", "ppo_cli.cli.train", *args], _env(threads), "ppo-cli", "eval @")
    wall = time.perf_counter() - t0
    row = {"task": task.name, "seed": seed, "tool": "ppo-cli"}
    if code != 0:
        print(f"  ppo-cli failed: {_last_line(stderr, code)}")
        return {**row, "failed": True}
    result = json.loads((run_dir / "result.json").read_text())
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]

    def scalars(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)} if tag in tags else {}

    means, stds, cuts = scalars("eval/mean_return"), scalars("eval/std_return"), scalars("eval/cut_episodes")
    curve = [{"step": s, "mean": v, "std": stds.get(s, 0.0), "cut": int(cuts.get(s, 0))} for s, v in means.items()]
    final = result.get("final_eval")
    if final and (not curve or curve[-1]["step"] != result["global_step"]):
        curve.append({"step": result["global_step"], "mean": final["mean_return"], "std": final["std_return"],
                      "cut": int(final.get("cut_episodes", 0))})
    return {**row, "steps": result["global_step"], "curve": curve, "train_score": result.get("recent_train_return"),
            "train_s": result["wall_time"], "wall_s": wall, "sps": result["sps"]}


def run_sb3(task: Task, seed: int, overrides: list[str], device: str, threads: int, out: Path) -> dict:
    run_dir = out / f"{task.name}-seed{seed}-sb3"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    print(f"$ SB3 PPO CnnPolicy on the config of: ppo-train {' '.join(overrides)}", flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(overrides), "--out", str(run_dir),
           "--device", device, "--threads", str(threads)]
    t0 = time.perf_counter()
    code, lines, stderr = _stream(cmd, {**_env(threads), "PYTHONWARNINGS": "ignore"}, "sb3", "eval @")
    wall = time.perf_counter() - t0
    row = {"task": task.name, "seed": seed, "tool": "SB3"}
    line = next((ln for ln in lines if ln.startswith("RESULT ")), None)
    if code != 0 or line is None:
        print(f"  SB3 failed: {_last_line(stderr, code)}")
        return {**row, "failed": True}
    return {**row, **json.loads(line[len("RESULT "):]), "wall_s": wall}


def sb3_worker(overrides: list[str], run_dir: Path, device: str, threads: int) -> dict:
    """Train SB3 on the config of `overrides` and evaluate it as ppo-cli evaluates its runs (module doc)."""
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    from ppo_cli.envs.make import make_vec_env
    from ppo_cli.run.evaluation import EVAL_SEED_OFFSET, run_episodes

    torch.set_num_threads(threads)
    cfg = compose(overrides)
    ev = cfg.eval
    model = sb3_atari_ppo(cfg, device=device, tensorboard_log=str(run_dir))
    seed = cfg.seed + EVAL_SEED_OFFSET
    envs = make_vec_env(cfg.env, seed=seed, num_envs=min(ev.episodes, cfg.env.num_envs),
                        step_cap=ev.max_episode_steps)
    if model.observation_space.shape != envs.single_observation_space.shape:
        raise SystemExit(f"SB3 reads {model.observation_space.shape} observations, ppo-cli's evaluation envs give "
                         f"{envs.single_observation_space.shape}")
    curve: list[dict] = []
    eval_s = 0.0

    def evaluate(step: int) -> None:
        nonlocal eval_s
        t0 = time.perf_counter()
        result = run_episodes(envs, lambda obs, _mask, _starts: model.predict(obs, deterministic=ev.deterministic)[0],
                              ev.episodes, seed)
        eval_s += time.perf_counter() - t0
        curve.append({"step": step, "mean": result.mean_return, "std": result.std_return, "cut": result.cut})
        print(f"eval @ {step:,}: mean return {result.mean_return:.2f} +/- {result.std_return:.2f} over "
              f"{len(result.returns)} episodes ({result.cut} cut)", flush=True)

    class Periodic(BaseCallback):
        """Evaluates after the update that crosses a multiple of eval.every_steps, as PeriodicEvaluator.due: the
        next rollout's start is the first moment after SB3's update."""

        def __init__(self) -> None:
            super().__init__()
            self.last = 0

        def _on_rollout_start(self) -> None:
            self.check()

        def _on_step(self) -> bool:
            return True

        def check(self) -> None:
            now = self.model.num_timesteps
            if ev.every_steps and now // ev.every_steps > self.last // ev.every_steps:
                evaluate(now)
            self.last = now

    periodic = Periodic()
    t0 = time.perf_counter()
    model.learn(total_timesteps=cfg.algo.total_timesteps, callback=periodic)
    periodic.check()  # the last update has no next rollout
    learn_s = time.perf_counter() - t0
    if ev.final and (not curve or curve[-1]["step"] != model.num_timesteps):
        evaluate(model.num_timesteps)
    envs.close()
    train_s = learn_s - eval_s
    # SB3's Monitor sits below its AtariWrapper, so these are whole games with raw scores, as ppo-cli's.
    games = [float(e["r"]) for e in model.ep_info_buffer]
    return {"steps": model.num_timesteps, "curve": curve, "train_score": sum(games) / len(games) if games else None,
            "train_s": train_s, "sps": model.num_timesteps / train_s}


def _score(point: dict | None) -> str:
    if point is None:
        return "-"
    cut = f" ({point['cut']} cut)" if point["cut"] else ""
    return f"{point['mean']:.1f} +/- {point['std']:.1f}{cut}"


def _mean(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_side_by_side(ours: dict, peer: dict | None) -> None:
    """One curve (step, ppo-cli score) or, with a peer, both on the steps either evaluated at."""
    curves = [r.get("curve", []) for r in (ours, peer) if r is not None]
    by_step = [{p["step"]: p for p in c} for c in curves]
    names = ["ppo-cli"] + (["SB3"] if peer is not None else [])
    print(f"\n  {ours['task']}, seed {ours['seed']}: eval score (mean +/- std over the episodes)")
    print(f"  {'step':>10}  " + "  ".join(f"{n:>24}" for n in names))
    for step in sorted(set().union(*by_step)):
        print(f"  {step:>10,}  " + "  ".join(f"{_score(points.get(step)):>24}" for points in by_step))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["pendulum", "halfcheetah"],
                   help=f"{', '.join(TASKS)}, or an Atari preset of conf/env/ in lower case (breakout, pong, ...)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--steps", type=int, help="override each task's step budget")
    p.add_argument("--every", type=int, help="override each task's evaluation interval")
    p.add_argument("--episodes", type=int, default=10, help="episodes per evaluation (default 10)")
    p.add_argument("--peer", choices=PEERS, help="also train this tool on each (Atari) task and print both curves")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="for both tools (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, for both tools (default 1)")
    p.add_argument("--parallel", action="store_true",
                   help="train the peer at the same time as ppo-cli (two processes; for a machine with 2+ cores)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(sb3_worker(json.loads(args.worker), args.out, args.device, args.threads)))
        return
    tasks = []
    for name in args.tasks:
        task = resolve(name)
        if task is None:
            p.error(f"unknown task {name!r}: choose from {', '.join([*TASKS, *atari_presets()])}")
        if args.peer and not task.atari:
            p.error(f"--peer {args.peer} compares Atari tasks only; {name!r} is not one")
        tasks.append(task)
    if args.peer:
        try:
            import stable_baselines3  # noqa: F401
        except ImportError:
            p.error(f"--peer {args.peer} needs Stable-Baselines3: pip install '.[bench,atari]'")
    out = args.out.resolve()  # the SB3 worker and ppo-train may run from another folder
    rows = []
    for task in tasks:
        for seed in args.seeds:
            overrides = overrides_for(task, seed, args.steps or task.steps, args.every or task.every, args.episodes,
                                      args.device, args.threads)
            if args.peer and args.parallel:
                with ThreadPoolExecutor(2) as pool:  # each side is a subprocess: threads only wait on them
                    ours_f = pool.submit(run_ppo_cli, task, seed, overrides, args.threads, out)
                    peer_f = pool.submit(run_sb3, task, seed, overrides, args.device, args.threads, out)
                    ours, peer = ours_f.result(), peer_f.result()
            else:
                ours = run_ppo_cli(task, seed, overrides, args.threads, out)
                peer = run_sb3(task, seed, overrides, args.device, args.threads, out) if args.peer else None
            print_side_by_side(ours, peer)
            rows += [(task, r) for r in (ours, peer) if r is not None]
    print("\n| task | seed | tool | steps | final eval | best eval | training episodes (last 100) | target | "
          "first >= target at | train time | wall time | SPS |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task, r in rows:
        if r.get("failed") or not r["curve"]:
            print(f"| {r['task']} | {r['seed']} | {r['tool']} | failed | | | | | | | | |")
            continue
        curve = r["curve"]
        reached = next((p["step"] for p in curve if task.target is not None and p["mean"] >= task.target), None)
        reached_text = f"{reached:,} steps" if reached is not None else "not reached"
        print(f"| {r['task']} | {r['seed']} | {r['tool']} | {r['steps']:,} | {curve[-1]['mean']:.1f} | "
              f"{max(p['mean'] for p in curve):.1f} | {_mean(r.get('train_score'))} | {task.target_label} | "
              f"{reached_text} | "
              f"{r['train_s'] / 60:.1f} min | {r['wall_s'] / 60:.1f} min | {r['sps']:,.0f} |")


if __name__ == "__main__":
    main()
