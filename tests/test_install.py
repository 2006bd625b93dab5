"""The installed package (not the source tree) ships its configs: console scripts work from any folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("tool", ["ppo-train", "ppo-eval"])
def test_console_scripts_from_an_unrelated_directory(tmp_path, tool):
    exe = BIN / tool
    assert exe.exists(), f"{exe} missing: install the project first (pip install '.[dev]')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if tool == "ppo-eval":
        proc = subprocess.run([str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert proc.returncode == 0 and "--episodes" in proc.stdout
        return
    proc = subprocess.run([str(exe), "env.num_envs=2", "algo.n_steps=32", "algo.batch_size=32",
                           "algo.total_timesteps=64", "eval.episodes=1"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(tmp_path.glob("runs/*/*/checkpoints/checkpoint.pt"))
