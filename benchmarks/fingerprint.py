"""Fingerprints of short training runs: a hash of each run's final parameters and optimizer state.

For refactors that must not change what is computed: run it on the code before and after (PYTHONPATH picks the
tree, so `git worktree add /tmp/before <commit>` then `--tree /tmp/before`) and compare the printed hashes.

    python benchmarks/fingerprint.py --tree . --out after.json
    python benchmarks/fingerprint.py --tree /tmp/before --out before.json
    diff before.json after.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

QUIET = ["eval.every_steps=0", "eval.final=false", "eval.objective=train", "log_interval=1000000"]
RUNS = {
    "defaults": ["algo.total_timesteps=4096"],
    # Periodic evaluation and best.pt on: evaluating must not move the training streams.
    "evaluated": ["algo.total_timesteps=4096", "eval.every_steps=2048", "eval.episodes=2"],
    "torch-rollout-autograd": ["algo.total_timesteps=4096", "fast_rollout=false", "fast_update=false"],
    "lstm": ["env=CartPoleNoVel-v1", "algo=ppo_lstm", "algo.total_timesteps=2048"],
    "pendulum": ["env=Pendulum-v1", "algo=ppo_pendulum", "algo.total_timesteps=4096"],
    "masks": ["env=MaskedGrid-v0", "algo.total_timesteps=4096"],
    "dict": ["env=GoalReach-v0", "algo.total_timesteps=4096"],
    "atari": ["env=Breakout", "network=cnn", "algo=ppo_atari", "algo.n_steps=32", "algo.batch_size=64",
              "algo.total_timesteps=512"],
    "torchrun-2": ["env.num_envs=2", "algo.n_steps=128", "algo.batch_size=64", "algo.total_timesteps=1024"],
}


def fingerprint(path: Path) -> dict[str, str]:
    import torch

    data = torch.load(path, map_location="cpu", weights_only=True)

    def digest(obj: object) -> str:
        h = hashlib.sha256()

        def walk(o: object) -> None:
            if isinstance(o, torch.Tensor):
                h.update(o.detach().contiguous().cpu().numpy().tobytes())
            elif isinstance(o, dict):
                for k in sorted(o, key=str):
                    h.update(str(k).encode())
                    walk(o[k])
            elif isinstance(o, (list, tuple)):
                for v in o:
                    walk(v)
            else:
                h.update(repr(o).encode())

        walk(obj)
        return h.hexdigest()[:16]

    return {"policy": digest(data["policy"]), "optimizer": digest(data["optimizer"]["state"]),
            "global_step": str(data["global_step"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default=".", help="the source tree to run (put first on PYTHONPATH)")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (e.g. env.vectorization=sync: "
                                                          "a default that changed, held at its old value)")
    args = p.parse_args()
    tree = str(Path(args.tree).resolve())
    env = {**os.environ, "PYTHONPATH": tree, "PYTHONWARNINGS": "ignore"}
    result = {}
    for name in args.runs:
        work = Path(tempfile.mkdtemp(prefix=f"fp-{name}-"))
        run = work / "run"
        # Later overrides win: a run's own eval settings replace QUIET's.
        cmd = [sys.executable, "-m", "ppo_cli.cli.train", *QUIET, *RUNS[name], *args.extra, f"hydra.run.dir={run}"]
        if name.startswith("torchrun"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                   "-m", "ppo_cli.cli.train", *QUIET, *RUNS[name], *args.extra, f"hydra.run.dir={run}"]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            result[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
        else:
            result[name] = fingerprint(run / "checkpoints" / "checkpoint.pt")
        print(name, json.dumps(result[name]), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
