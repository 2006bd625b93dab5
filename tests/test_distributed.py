"""One run across 2 processes (torchrun, gloo on the CPU): identical parameters, steps that add up, files from
rank 0 alone, learning, stop and resume on SIGTERM, a crashing rank, a resume with another process count."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY, cli

SMALL = [*TINY, "checkpoint_interval=1"]


def torchrun(*args: str, cwd: Path, timeout: float = 180, env_extra: dict | None = None,
             popen: bool = False) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "ppo_cli.cli.train", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_train_as_one_run_and_rank_0_alone_writes(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(*SMALL, "algo.total_timesteps=1024", "eval.every_steps=512", f"hydra.run.dir={run}",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=True)
    # 2 ranks x 2 envs x 64 steps = 256 steps an update: 4 updates reach 1024
    assert data["global_step"] == 1024 and data["update"] == 4 and data["world_size"] == 2
    rank1 = data["ranks"][0]
    assert not torch.equal(rank1["last_obs"], data["last_obs"])  # envs of their own, seeded apart
    # Every checkpoint compared the ranks' parameters (state() raises if they differ): 4 comparisons passed.
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert json.loads((run / "result.json").read_text())["global_step"] == 1024
    assert "ppo-cli-rank1" not in " ".join(os.listdir(tmp_path))
    assert proc.stdout.count("done:") == 1  # rank 1 prints nothing
    out = cli("ppo-eval", str(run / "checkpoints" / "checkpoint.pt"), "--episodes", "2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr


def test_no_two_ranks_share_an_env_seed(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(*SMALL, "env.entry_point=tests.custom_env:SeedEcho", "env.kwargs.length=1000", "seed=7",
                    "eval.final=false", "eval.objective=train", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=True)
    # seed + rank * num_envs + i: rank 0's envs 7, 8 and rank 1's 9, 10
    assert data["last_obs"].flatten().tolist() == [7.0, 8.0]
    assert data["ranks"][0]["last_obs"].flatten().tolist() == [9.0, 10.0]


def test_two_ranks_learn_cartpole(tmp_path):
    run = tmp_path / "run"
    proc = torchrun("env.num_envs=4", "algo.n_steps=256", "algo.total_timesteps=98304", "eval.every_steps=16384",
                    "eval.episodes=5", "eval.stop_at_return=300", "eval.final=false", "eval.objective=best",
                    f"hydra.run.dir={run}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "result.json").read_text())["objective"] >= 300


def test_sigterm_stops_every_rank_at_one_update_and_the_run_resumes(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(*SMALL, "algo.total_timesteps=10000000", f"hydra.run.dir={run}", cwd=tmp_path, popen=True)
    ckpt = run / "checkpoints" / "checkpoint.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)  # Slurm signals every process of the job
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "interrupted by SIGTERM" in err and "resume with" in err, err[-3000:]
    data = torch.load(ckpt, weights_only=True)
    step = data["global_step"]
    assert step % 256 == 0 and data["world_size"] == 2  # at an update boundary of both ranks
    resumed = torchrun(*SMALL, f"resume={ckpt}", f"algo.total_timesteps={step + 512}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(ckpt, weights_only=True)["global_step"] == step + 512


def test_a_crashing_rank_ends_the_run_with_one_line_naming_it(tmp_path):
    t0 = time.time()
    proc = torchrun(*SMALL, "env.entry_point=tests.custom_env:CrashOnRank1", "algo.total_timesteps=100000",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=240)
    assert proc.returncode != 0 and time.time() - t0 < 200
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank 1] ppo-train: error:")]
    assert len(ours) == 1 and "the simulator lost its connection" in ours[0], proc.stderr[-3000:]
    assert "Traceback" not in "\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith("[rank"))


def test_resuming_with_another_process_count_is_one_line(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(*SMALL, "algo.total_timesteps=256", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = cli("ppo-train", f"resume={run / 'checkpoints' / 'checkpoint.pt'}", "algo.total_timesteps=1024",
                 cwd=tmp_path)
    assert single.returncode == 2
    lines = [ln for ln in single.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "a 2-process run" in lines[0] and "--nproc_per_node=2" in lines[0], single.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs (nccl)")
def test_nccl_on_gpus(tmp_path):  # pragma: no cover - runs where GPUs are
    proc = torchrun(*SMALL, "device=cuda", "algo.total_timesteps=512", f"hydra.run.dir={tmp_path / 'run'}",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
