"""Resume equivalence, interruption by signals, SIGKILL safety, and refusing bad checkpoint files."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ppo_cli.cli.evaluate import load_policy
from ppo_cli.errors import UserError
from ppo_cli.run import checkpoint
from ppo_cli.run.runner import Interrupted, Runner

from .conftest import ROOT, cli, make_cfg

RESUME_CFG = ["env.num_envs=4", "algo.n_steps=32", "algo.batch_size=32", "algo.total_timesteps=512",
              "algo.lr_schedule=linear", "algo.ent_schedule=linear", "eval.final=false", "eval.every_steps=0",
              "eval.objective=train", "checkpoint_interval=0"]


def _train(cfg, run_dir, resume=None, interrupt_after=None):
    trainer = Runner(cfg, run_dir, resume=resume, rich_progress=False)
    if interrupt_after is not None:  # deliver a "signal" right after the n-th update, as a Ctrl-C would
        log = trainer._log

        def log_then_interrupt(*args):
            log(*args)
            if trainer.update_idx == interrupt_after:
                trainer.stops.signal = signal.SIGINT

        trainer._log = log_then_interrupt
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def test_interrupt_and_resume_gives_bitwise_identical_parameters(tmp_path):
    cfg = make_cfg(*RESUME_CFG)
    straight = _train(cfg, tmp_path / "straight")
    with pytest.raises(Interrupted) as stop:
        _train(make_cfg(*RESUME_CFG), tmp_path / "split", interrupt_after=2)
    assert stop.value.step == 256
    data = checkpoint.load(stop.value.path)
    assert data["global_step"] == 256 and data["env_state"] is not None
    resumed = _train(make_cfg(*RESUME_CFG), tmp_path / "split", resume=data)
    assert resumed.global_step == straight.global_step == 512
    straight, resumed = straight.algo, resumed.algo
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for sa, sb in zip(straight.optimizer.state_dict()["state"].values(),
                      resumed.optimizer.state_dict()["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [g["lr"] for g in straight.optimizer.param_groups] == [g["lr"] for g in resumed.optimizer.param_groups]


def _spawn(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "ppo_cli.cli.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


LONG = ["env.num_envs=2", "algo.n_steps=64", "algo.batch_size=32", "algo.total_timesteps=10_000_000",
        "checkpoint_interval=1", "eval.final=false", "eval.every_steps=0", "eval.objective=train"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_prints_resume_command(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "checkpoint.pt"
    proc = _spawn([*LONG, f"hydra.run.dir={run_dir}"], tmp_path)
    _wait_for(ckpt, proc)
    step_before = checkpoint.load(ckpt)["global_step"]
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"resume with: ppo-train resume={ckpt}" in err and "Traceback" not in err
    assert checkpoint.load(ckpt)["global_step"] >= step_before
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    # Resuming continues in the same run directory and the same TensorBoard curves, up to total_timesteps.
    step = checkpoint.load(ckpt)["global_step"]
    target = step + 256
    res = cli("ppo-train", f"resume={ckpt}", f"algo.total_timesteps={target}", cwd=tmp_path, check=True)
    assert f"run dir:    {run_dir}" in res.stdout
    assert checkpoint.load(ckpt)["global_step"] == target


def test_sigkill_leaves_the_previous_checkpoint_loadable(tmp_path):
    for delay in (0.3, 0.75):
        run_dir = tmp_path / f"run-{delay}"  # a folder of its own: one that holds a run is refused
        ckpt = run_dir / "checkpoints" / "checkpoint.pt"
        proc = _spawn([*LONG, f"hydra.run.dir={run_dir}"], tmp_path)
        _wait_for(ckpt, proc)
        time.sleep(delay)  # checkpoints are written every update: the kill often lands mid-save
        proc.kill()
        proc.wait()
        assert checkpoint.load(ckpt)["global_step"] > 0


def test_resume_refuses_changing_groups(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    proc = cli("ppo-train", f"resume={ckpt}", "env=Acrobot-v1", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot change the config group 'env' when resuming" in proc.stderr


@pytest.fixture
def bad_files(tmp_path, tiny_run):
    good = tiny_run / "checkpoints" / "checkpoint.pt"
    files = {"missing": tmp_path / "nope.pt", "directory": tiny_run}
    (tmp_path / "empty.pt").write_bytes(b"")
    files["empty"] = tmp_path / "empty.pt"
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    files["truncated"] = tmp_path / "truncated.pt"
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    files["text"] = tmp_path / "text.pt"
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    files["foreign"] = tmp_path / "foreign.pt"
    newer = checkpoint.load(good)
    newer["format_version"] = checkpoint.FORMAT_VERSION + 1
    torch.save(newer, tmp_path / "newer.pt")
    files["newer"] = tmp_path / "newer.pt"
    alien = checkpoint.load(good)
    alien["config_yaml"] += "bogus_key: 1\n"
    torch.save(alien, tmp_path / "alien_config.pt")
    files["alien_config"] = tmp_path / "alien_config.pt"
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "ppo-cli-checkpoint", "x": Evil()}, tmp_path / "evil.pt")  # a malicious torch file
    files["evil"] = tmp_path / "evil.pt"
    with open(tmp_path / "evil_raw.pt", "wb") as f:  # the same payload as a bare pickle
        pickle.dump({"x": Evil()}, f, protocol=4)
    files["evil_raw"] = tmp_path / "evil_raw.pt"
    return files, marker


EXPECTED = {"missing": "does not exist", "directory": "is a directory", "empty": "is empty",
            "truncated": "truncated or corrupt", "text": "truncated or corrupt",
            "foreign": "not a ppo-cli checkpoint",
            "alien_config": "config does not fit this ppo-cli version", "newer": "newer than this ppo-cli reads",
            "evil": "could run code", "evil_raw": "truncated or corrupt, or not a torch file"}


def test_bad_checkpoints_each_get_one_clear_error(bad_files):
    files, marker = bad_files
    for name, path in files.items():
        with pytest.raises(UserError, match=EXPECTED[name]):
            load_policy(checkpoint.load(path))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["missing", "truncated", "evil", "newer", "alien_config"])
def test_ppo_eval_bad_checkpoint_is_one_line_exit_2(bad_files, tmp_path, name):
    files, marker = bad_files
    proc = cli("ppo-eval", str(files[name]), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and EXPECTED[name] in lines[0]
    assert not marker.exists()


def test_ppo_eval_rejects_env_with_other_spaces(tiny_run, tmp_path):
    proc = cli("ppo-eval", str(tiny_run / "checkpoints" / "checkpoint.pt"), "--env", "Acrobot-v1", cwd=tmp_path)
    assert proc.returncode == 2 and "but the policy was trained for" in proc.stderr


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = checkpoint.save({"config_yaml": "a: 1", "observation_space": {}, "action_space": {}, "policy": {},
                            "global_step": 1}, tmp_path / "c.pt")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save({"global_step": 2}, path)
    assert checkpoint.load(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
