from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from ppo_cli.config import register_configs
from ppo_cli.envs import atari
from ppo_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
try:
    atari.register()
    HAVE_ATARI = True
except UserError:  # the atari extra (ale-py, opencv) is not installed
    HAVE_ATARI = False
needs_atari = pytest.mark.skipif(not HAVE_ATARI, reason="ale-py / opencv not installed: pip install '.[atari]'")

# Small, fast runs: 2 envs x 64 steps per update.
TINY = ["env.num_envs=2", "algo.n_steps=64", "algo.batch_size=32", "algo.total_timesteps=256",
        "eval.episodes=2", "eval.every_steps=0", "checkpoint_interval=1"]


def cli(tool: str, *args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """Run `ppo-train` / `ppo-eval` as a user would, in a subprocess, from `cwd`."""
    module = {"ppo-train": "ppo_cli.cli.train", "ppo-eval": "ppo_cli.cli.evaluate",
              "ppo-sweep-report": "ppo_cli.cli.sweep_report", "ppo-export": "ppo_cli.cli.export"}[tool]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_cfg(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_module("ppo_cli.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="session")
def _tiny_run_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("tiny")
    cli("ppo-train", *TINY, f"hydra.run.dir={base / 'run'}", cwd=base, check=True)
    return base / "run"


@pytest.fixture
def tiny_run(_tiny_run_once: Path, tmp_path: Path) -> Path:
    """A finished tiny CartPole run (trained once per session), copied so each test may change it."""
    return Path(shutil.copytree(_tiny_run_once, tmp_path / "run"))


def check_resume_is_bitwise(overrides: list[str], tmp_path: Path, total: int, split: int) -> dict:
    """Train `total` steps straight, and `split` steps then resume to `total`: the parameters must be the same bit
    for bit. Returns the checkpoint written at the split, for the caller's own checks."""
    from ppo_cli.run import checkpoint
    from ppo_cli.run.runner import Runner

    straight = Runner(make_cfg(*overrides, f"algo.total_timesteps={total}"), tmp_path / "a", rich_progress=False)
    straight.run()
    first = Runner(make_cfg(*overrides, f"algo.total_timesteps={split}"), tmp_path / "b", rich_progress=False)
    first.run()
    data = checkpoint.load(tmp_path / "b" / "checkpoints" / "checkpoint.pt")
    resumed = Runner(make_cfg(*overrides, f"algo.total_timesteps={total}"), tmp_path / "b", resume=data,
                      rich_progress=False)
    resumed.run()
    for a, b in zip(straight.algo.policy.parameters(), resumed.algo.policy.parameters(), strict=True):
        assert torch.equal(a, b)
    for t in (straight, first, resumed):
        t.close()
    return data
