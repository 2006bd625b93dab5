"""Many seeds in one process (hydra/launcher=ppo_batched) against the same seeds as separate runs, one after another.

    python benchmarks/batched.py                                  # CartPole (1M steps), Pendulum; 8 seeds
    python benchmarks/batched.py --tasks cartpole --seeds 8 --steps 200000
    python benchmarks/batched.py --tasks breakout --steps 8192    # the CNN: members train one after another
    python benchmarks/batched.py --tolerance                      # a member against its single run, update by update

Each side is one subprocess per `ppo-train` command as a user types it: the batch is
`ppo-train -m seed=1,...,N hydra/launcher=ppo_batched ...`, the separate runs are N `ppo-train seed=k ...` started
one after another. Both sides use the same overrides (the preset's defaults, one torch thread, the same evaluation
settings). Printed per task: the wall time until all N have finished (process starts, evaluations and all), the
aggregate steps per second over that wall time and over training time alone (result.json's wall_time), the ratio,
peak memory (the batch's process divided by N, and a separate run's), and the final evaluation's mean over seeds
for both sides (batched members are the same runs to float rounding: tests/test_batched.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, child_env  # noqa: E402

TASKS = {
    "cartpole": ["env=CartPole-v1"],  # env.vectorization=auto: gymnasium's native vector CartPole
    "cartpole-sync": ["env=CartPole-v1", "env.vectorization=sync"],
    "pendulum": ["env=Pendulum-v1", "algo=ppo_pendulum"],
    # Training alone: a policy this young, played deterministically, may never serve and play to the evaluation's
    # step cap of 108,000 steps per episode.
    "breakout": ["env=Breakout", "algo=ppo_atari", "eval.every_steps=0", "eval.final=false", "eval.objective=train"],
}
# CartPole: the seed defaults' 1M steps; the others shorter, to fit a session.
DEFAULT_STEPS = {"cartpole": 1_000_000, "cartpole-sync": 200_000, "pendulum": 200_000, "breakout": 8_192}
COMMON = ["torch_threads=1", "log_interval=1000"]


def _run(args: list[str]) -> tuple[float, float]:
    """Run `ppo-train args` to the end; (wall seconds, its peak RSS in MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ppo_cli.cli.train", *args], cwd=ROOT, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ppo-train {' '.join(args)} failed:\n{proc.stderr.read()}")  # type: ignore[union-attr]
    return wall, usage.ru_maxrss / 1024


def _results(folders: list[Path]) -> list[dict]:
    return [json.loads((f / "result.json").read_text()) for f in folders]


def _final(results: list[dict]) -> str:
    finals = [r["final_eval"]["mean_return"] for r in results if r.get("final_eval")]
    return f"{statistics.mean(finals):.1f} +/- {statistics.stdev(finals):.1f}" if len(finals) > 1 else "n/a"


def compare(task: str, seeds: int, steps: int, work: Path) -> None:
    overrides = [*TASKS[task], *COMMON, f"algo.total_timesteps={steps}"]
    seed_list = ",".join(str(s) for s in range(1, seeds + 1))
    batch_dir = work / task / "batched"
    wall_b, rss_b = _run(["-m", f"seed={seed_list}", "hydra/launcher=ppo_batched", *overrides,
                          f"hydra.sweep.dir={batch_dir}"])
    batched = _results([batch_dir / str(j) for j in range(seeds)])
    wall_s, rss_s, folders = 0.0, 0.0, []
    for s in range(1, seeds + 1):
        folder = work / task / "separate" / str(s)
        wall, rss = _run([f"seed={s}", *overrides, f"hydra.run.dir={folder}"])
        wall_s, rss_s = wall_s + wall, max(rss_s, rss)
        folders.append(folder)
    separate = _results(folders)
    total = sum(r["global_step"] for r in batched)
    with_batch = batched[0].get("batched_with", 1)
    # Members of a batch train side by side (each one's wall_time is the batch's); members a batch could not take
    # (batched_with 1: a CNN, say) train one after another in its process.
    train_b = max(r["wall_time"] for r in batched) if with_batch > 1 else sum(r["wall_time"] for r in batched)
    train_s = sum(r["wall_time"] for r in separate)
    print(f"\n{task}: {seeds} seeds x {steps:,} steps ({' '.join(TASKS[task])}); batch of {with_batch}")
    print(f"  {'':<22} {'wall to all done':>17} {'aggregate SPS':>14} {'training SPS':>13} {'peak MB/run':>12} "
          f"{'final return':>16}")
    print(f"  {'one batched process':<22} {wall_b:>15.1f} s {total / wall_b:>14,.0f} {total / train_b:>13,.0f} "
          f"{rss_b / seeds:>12.0f} {_final(batched):>16}")
    print(f"  {f'{seeds} separate runs':<22} {wall_s:>15.1f} s {total / wall_s:>14,.0f} {total / train_s:>13,.0f} "
          f"{rss_s:>12.0f} {_final(separate):>16}")
    print(f"  ratio: {wall_s / wall_b:.2f}x in wall time, {train_s / train_b:.2f}x in training time "
          f"(the batch's process peaks at {rss_b:.0f} MB in all)")


def tolerance(updates: int) -> None:
    """The largest parameter difference between the members of a batch of 4 and their single runs, per update."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from ppo_cli.run.batched import BatchedRunner
    from ppo_cli.run.runner import Runner
    from tests.conftest import make_cfg
    from tests.test_batched import CASES, QUIET

    for case, overrides in CASES.items():
        work = Path(tempfile.mkdtemp())
        cfgs = [make_cfg(*overrides, *QUIET, f"seed={s}") for s in (3, 4, 5, 6)]
        batch = BatchedRunner([(c, work / f"b{i}") for i, c in enumerate(cfgs)])
        singles = [Runner(make_cfg(*overrides, *QUIET, f"seed={s}"), work / f"s{s}", rich_progress=False)
                   for s in (3, 4, 5, 6)]
        diffs = []
        for _ in range(updates):
            batch.algo.collect(batch.envs, lambda: False, np.ones(4, dtype=bool))
            for s in singles:
                s.algo.collect(s.envs, lambda: False, 0)
                s.algo.learn(0.0)
            batch.algo.learn([0.0] * 4, np.ones(4, dtype=bool))
            diffs.append(max(float((m.algo.policy.state_dict()[n] - v).abs().max())
                             for m, s in zip(batch.runners, singles, strict=True)
                             for n, v in s.algo.policy.state_dict().items()))
        print(f"{case:<24} " + " ".join(f"{d:.1e}" for d in diffs))
        batch.close()
        for s in singles:
            s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=["cartpole", "pendulum"])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="algo.total_timesteps per run (default: per task)")
    parser.add_argument("--tolerance", type=int, nargs="?", const=10, default=None, metavar="UPDATES",
                        help="instead: a member against its single run over the first UPDATES updates")
    args = parser.parse_args()
    if args.tolerance:
        tolerance(args.tolerance)
        return
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks:
            compare(task, args.seeds, args.steps or DEFAULT_STEPS[task], Path(work))


if __name__ == "__main__":
    main()
