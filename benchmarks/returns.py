"""Learning benchmarks: train tasks with their presets and print the evaluated return against steps.

    python benchmarks/returns.py                          # Pendulum-v1 and HalfCheetah-v5
    python benchmarks/returns.py --tasks hopper --seeds 1 2
    python benchmarks/returns.py --tasks pendulum --steps 200000

Each run is a plain `ppo-train` with the preset's overrides (printed, so any row can be rerun by hand),
evaluating deterministically every --every steps on separate envs. The table is read back from the run's
TensorBoard events (eval/mean_return) and its result.json. MuJoCo tasks need `pip install '.[mujoco]'`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# name: (overrides, default steps, default eval interval, target return to report against)
TASKS: dict[str, tuple[list[str], int, int, float]] = {
    "pendulum": (["env=Pendulum-v1", "algo=ppo_pendulum"], 500_000, 20_480, -250.0),
    "halfcheetah": (["env=HalfCheetah-v5", "algo=ppo_mujoco"], 1_000_000, 51_200, 1500.0),
    "hopper": (["env=Hopper-v5", "algo=ppo_mujoco"], 1_000_000, 51_200, 2000.0),
    "walker2d": (["env=Walker2d-v5", "algo=ppo_mujoco"], 1_000_000, 51_200, 2000.0),
    "lunarlander-continuous": (["env=LunarLanderContinuous-v3", "algo=ppo_mujoco"], 1_000_000, 51_200, 200.0),
}


def run(task: str, seed: int, steps: int | None, every: int | None, out: Path) -> dict:
    overrides, default_steps, default_every, target = TASKS[task]
    steps, every = steps or default_steps, every or default_every
    run_dir = out / f"{task}-seed{seed}"
    if run_dir.exists():  # a previous benchmark's events would mix into this run's curve
        shutil.rmtree(run_dir)
    args = [*overrides, f"seed={seed}", f"algo.total_timesteps={steps}", f"eval.every_steps={every}",
            "eval.episodes=10", f"hydra.run.dir={run_dir}"]
    print(f"$ ppo-train {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ppo_cli.cli.train", *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}")
        return {"task": task, "seed": seed, "failed": True}
    result = json.loads((run_dir / "result.json").read_text())
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("eval/mean_return")]
    reached = next((s for s, v in curve if v >= target), None)
    print(f"  {'step':>10}  {'eval return':>12}")
    for s, v in curve:
        print(f"  {s:>10,}  {v:>12.1f}")
    return {"task": task, "seed": seed, "steps": result["global_step"], "final": result["final_eval"]["mean_return"],
            "best": max(v for _, v in curve), "target": target, "reached_at": reached,
            "train_s": result["wall_time"], "wall_s": wall, "sps": result["sps"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["pendulum", "halfcheetah"], choices=sorted(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--steps", type=int, help="override each task's step budget")
    p.add_argument("--every", type=int, help="override each task's evaluation interval")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    args = p.parse_args()
    rows = [run(t, s, args.steps, args.every, args.out) for t in args.tasks for s in args.seeds]
    print("\n| task | seed | steps | final eval | best eval | target | first >= target at | train time | SPS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("failed"):
            print(f"| {r['task']} | {r['seed']} | failed | | | | | | |")
            continue
        reached = f"{r['reached_at']:,} steps" if r["reached_at"] is not None else "not reached"
        print(f"| {r['task']} | {r['seed']} | {r['steps']:,} | {r['final']:.1f} | {r['best']:.1f} | {r['target']:g} "
              f"| {reached} | {r['train_s'] / 60:.1f} min | {r['sps']:,.0f} |")


if __name__ == "__main__":
    main()
