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
             popen: bool = False, module: str = "ppo_cli.cli.train") -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", module, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           **(env_extra or {})}
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    if popen:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too: a timed-out test must leave no process behind
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
    # Issue 30, items 9-10: best.pt holds every rank's part, as checkpoint.pt does, and resumes under torchrun
    # (into a folder of its own); one process resuming it is refused, and so is a best.pt of rank 0's part alone.
    best_path = run / "checkpoints" / "best.pt"
    best = torch.load(best_path, weights_only=True)
    assert best["world_size"] == 2 and len(best["ranks"]) == 1 and best["eval"]["global_step"] in (512, 1024)
    single = cli("ppo-train", f"resume={best_path}", "algo.total_timesteps=2048", cwd=tmp_path)
    assert single.returncode == 2 and "a 2-process run and this run has 1" in single.stderr, single.stderr
    resumed = torchrun(f"resume={best_path}", "algo.total_timesteps=2048", f"hydra.run.dir={tmp_path / 'again'}",
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "again" / "checkpoints" / "checkpoint.pt", weights_only=True)["global_step"] == 2048
    torch.save({**best, "ranks": None}, tmp_path / "legacy.pt")
    legacy = torchrun(f"resume={tmp_path / 'legacy.pt'}", "algo.total_timesteps=2048", cwd=tmp_path)
    assert legacy.returncode != 0 and "holds only rank 0's part of a 2-process run's state" in legacy.stderr


@pytest.mark.slow  # two evaluations of over 6 s each by design; the other torchrun runs evaluate too
def test_the_other_ranks_wait_for_an_evaluation_longer_than_the_collectives_timeout(tmp_path):
    """Issue 30, item 10: rank 0 evaluates alone; with the collectives' timeout cut to 3 s and each evaluation
    taking over 6 s (tests/slow_eval_main.py), rank 1 waits for both evaluations instead of timing out."""
    run = tmp_path / "run"
    proc = torchrun(*SMALL, "algo.total_timesteps=512", "eval.every_steps=256", "eval.final=false",
                    "eval.objective=best", f"hydra.run.dir={run}", cwd=tmp_path, module="tests.slow_eval_main")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval @") == 2 and json.loads((run / "result.json").read_text())["global_step"] == 512


def test_no_two_ranks_share_an_env_seed(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(*SMALL, "env.entry_point=tests.custom_env:SeedEcho", "env.kwargs.length=1000", "seed=7",
                    "eval.final=false", "eval.objective=train", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = torch.load(run / "checkpoints" / "checkpoint.pt", weights_only=True)
    # seed + rank * num_envs + i: rank 0's envs 7, 8 and rank 1's 9, 10
    assert data["last_obs"].flatten().tolist() == [7.0, 8.0]
    assert data["ranks"][0]["last_obs"].flatten().tolist() == [9.0, 10.0]


@pytest.mark.slow  # the 2-rank update equals the 1-process one (test above)
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


@pytest.mark.parametrize(("body", "code", "err"), [
    ("sys.exit(3)", 3, ""),
    ("sys.exit('ppo-train: error: bad')", 1, "ppo-train: error: bad"),
    ("raise ValueError('broken')", 1, "ValueError: broken"),
])
def test_a_rank_ends_as_python_would_with_exit_handlers_threads_and_buffered_output(body, code, err):
    # A rank skips the interpreter's teardown (gloo's threads can abort it); what teardown does must still happen.
    script = f"""
import atexit, sys, threading, time
from ppo_cli.distributed import exit_after
atexit.register(lambda: print("handler ran", flush=True))
def body():
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
    sys.stdout.write("buffered, no newline")
    {body}
exit_after(body)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.startswith("buffered, no newline") and "thread finished" in proc.stdout
    assert proc.stdout.index("thread finished") < proc.stdout.index("handler ran"), proc.stdout
    assert err in proc.stderr and ("Traceback" in proc.stderr) == body.startswith("raise")


@pytest.mark.slow  # a torchrun run for one refusal line
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


def _update_worker(rank: int, port: int, out: str) -> None:
    """One rank: update on its half of a fixed batch (one minibatch per epoch), with the numpy and the autograd
    gradients; rank 0 also updates copies of the same policy in one process on the whole batch, and saves all."""
    import gymnasium as gym

    from ppo_cli import distributed
    from ppo_cli.algo.storage import Batch
    from ppo_cli.algo.update import Updater, UpdateSettings, make_optimizer
    from ppo_cli.envs.spaces import describe_space
    from ppo_cli.policy.actor_critic import build_policy
    from tests.conftest import make_cfg

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    env, cfg = gym.make("CartPole-v1"), make_cfg()

    def policy() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_policy(describe_space(env.observation_space), describe_space(env.action_space, bounds=True), cfg)

    def update(p: torch.nn.Module, batch: Batch, fast: bool, ranks: distributed.Ranks | None) -> dict:
        opt = make_optimizer(p, "adam", 3e-4, 3e-4, 1e-5, 0.0)
        updater = Updater.build(p, opt, torch.Generator().manual_seed(rank), fast, False, ranks)[0]
        updater.update(batch, UpdateSettings(0.1, None, 0.01, 0.5, 0.5, 3, len(batch), True, None))
        return {k: v.clone() for k, v in p.state_dict().items()}

    g = torch.Generator().manual_seed(1)
    n = 64
    full = Batch(torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g),
                 -torch.rand(n, generator=g) - 0.3, torch.randn(n, generator=g),
                 torch.cat([torch.randn(n // 2, generator=g) + 1.0, torch.randn(n // 2, generator=g) * 3]),
                 torch.randn(n, generator=g))
    ranks = distributed.setup(torch.device("cpu"))
    mine = full[slice(rank * n // 2, (rank + 1) * n // 2)]
    results = {"initial": policy().state_dict()}
    for fast in (True, False):
        results[f"two_{fast}"] = update(policy(), mine, fast, ranks)
    distributed.teardown()
    if rank == 0:
        for fast in (True, False):
            results[f"one_{fast}"] = update(policy(), full, fast, None)
        torch.save(results, out)


def test_two_ranks_update_equals_one_process_on_both_halves(tmp_path):
    """The data-parallel update is the single-process update: gradients averaged over ranks, advantages normalized
    over every rank's minibatch together (the halves' advantages differ in mean and scale, so per-rank
    normalization would not pass). Each rank holds half the batch, one minibatch per epoch; numpy and autograd."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = str(tmp_path / "params.pt")
    mp.spawn(_update_worker, args=(port, out), nprocs=2, join=True)
    r = torch.load(out, weights_only=True)
    for fast in (True, False):
        two, one = r[f"two_{fast}"], r[f"one_{fast}"]
        assert any(not torch.equal(one[k], r["initial"][k]) for k in one)  # the update moved the parameters
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-5, msg=f"{name} (numpy={fast})")


def test_a_gpu_run_joins_a_backend_for_every_device_its_collectives_use(monkeypatch):
    """Issue 30, item 7: a torchrun run on cuda joined nccl alone, and the CPU tensors of any_true, mean and normalize
    then raised 'No backend type associated with device type cpu' at the first update. The collectives are run
    here with recording stand-ins (no GPU needed), and every device type they hand a collective must have a
    backend in what setup joins for cuda."""
    from ppo_cli import distributed
    from ppo_cli.policy.normalize import ObsNormalizer

    used = set()
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: used.add(t.device.type))
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, obj: (used.add(obj.device.type), out.__setitem__(slice(None), [obj] * len(out))))
    ranks = distributed.Ranks(0, 2)
    distributed.any_true(True, ranks)
    distributed.mean(1.0, ranks)
    distributed.normalize(torch.arange(6.0), ranks)
    norm = ObsNormalizer(3, clip=10.0)
    before = (norm.mean.clone(), norm.var.clone(), norm.count.clone())
    norm.update(torch.randn(5, 3))
    distributed.merge_obs_stats(norm, before, ranks)
    assert used == {"cpu"}
    backends = dict(part.split(":") for part in distributed.backend_for(torch.device("cuda")).split(","))
    assert backends == {"cpu": "gloo", "cuda": "nccl"}  # the gradients (average) are on cuda, the rest on the CPU
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
