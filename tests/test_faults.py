"""Faults that get one line (issue 19): each ends with an exit code and one `ppo-train: error:` line naming the
problem, never a traceback; run folders are never shared, and failed starts leave none behind."""

import errno
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ppo_cli import __version__
from ppo_cli.cli import run_folder, sweep_report, train
from ppo_cli.cli.overrides import check_overrides
from ppo_cli.config import config_from_yaml
from ppo_cli.errors import UserError
from ppo_cli.run import checkpoint
from ppo_cli.run.logger import Logger

from .conftest import ROOT, TINY, cli, make_cfg

JOB = [a for a in TINY if not a.startswith("algo.batch_size")] + ["eval.final=false", "eval.objective=train"]


def _one_line(stderr: str, fragment: str, tool: str = "ppo-train") -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{tool}: error:") and fragment in lines[0], stderr
    assert "Traceback" not in stderr


def _main(monkeypatch, capsys, *argv: str) -> tuple[int, str, str]:
    """ppo-train's main() in this process, for faults found before Hydra starts."""
    monkeypatch.setattr(sys, "argv", ["ppo-train", *argv])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it; monkeypatch puts it back
    try:
        train.main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


# --- found before Hydra composes: + and ~ keys (2), sweep keys, enum values (6), --config-dir -------------------

@pytest.mark.parametrize("args,fragment", [
    (["+algo.lr=1.0"], "unknown config key 'algo.lr' (did you mean 'algo.lr_actor'?)"),
    (["+foo=1"], "unknown config key 'foo'"),
    (["++algo.gama=0.9"], "unknown config key 'algo.gama' (did you mean 'algo.gamma'?)"),
    (["~foo"], "unknown config key 'foo'"),
    (["~algo.lr_actor"], "~algo.lr_actor: config keys cannot be removed"),
    (["+algo.lr_actor=1e-3"], "already in the config; set it without the '+': algo.lr_actor=1e-3"),
    (["-m", "+algo.foo=1,2"], "unknown config key 'algo.foo'"),
    (["-m", "algo.clip_rang=0.1,0.2"], "unknown config key 'algo.clip_rang' (did you mean 'algo.clip_range'?)"),
    (["-m", "hydra/sweeper=ppo_random", "hydra.sweeper.params.algo.lr=interval(0.1,0.2)"],
     "unknown config key 'algo.lr' in hydra.sweeper.params"),
    (["env.vectorization=asynch"], "env.vectorization=asynch: expected one of [auto, sync, async, native]"),
    (["--config-dir", "no_such_folder"], "--config-dir no_such_folder: no such folder"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_overrides_are_one_line_exit_2(monkeypatch, capsys, tmp_path, args, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 2
    _one_line(err, fragment)
    assert not list(tmp_path.iterdir())  # no run folder


def test_free_form_kwargs_and_double_plus_on_known_keys_still_pass():
    check_overrides(["++env.kwargs.x=1", "+env.kwargs.y=2", "env.kwargs.z=3", "++algo.lr_actor=1e-3",
                     "env.vectorization=async", "-m", "seed=1,2"])
    cfg = make_cfg("++env.kwargs.x=1", "env.vectorization=async")
    assert cfg.env.kwargs.x == 1


def test_vectorization_async_is_accepted_and_old_checkpoints_load():
    assert make_cfg("env.vectorization=async").env.vectorization == "async"  # what envs.py compares with
    assert config_from_yaml("env:\n  vectorization: async_\n").env.vectorization == "async"  # older checkpoints


def test_version_is_ppo_clis(monkeypatch, capsys):
    code, out, err = _main(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"ppo-cli {__version__}" and not err


# --- found by Hydra or at the start of a run ------------------------------------------------------------------

def _bad_yaml(tmp: Path, request) -> tuple[list[str], str]:
    (tmp / "conf" / "env").mkdir(parents=True)
    (tmp / "conf" / "env" / "mine.yaml").write_text("id: CartPole-v1\nnum_envs: [2\n")
    return ["--config-dir", str(tmp / "conf"), "env=mine"], f"{tmp / 'conf' / 'env' / 'mine.yaml'}: not valid YAML"


def _file_in_the_way(tmp: Path, request) -> tuple[list[str], str]:
    (tmp / "afile").write_text("")
    return [f"hydra.run.dir={tmp / 'afile' / 'run'}"], f"cannot write to the run folder {tmp / 'afile' / 'run'} " \
                                                       f"(Not a directory)"


def _runs_is_a_file(tmp: Path, request) -> tuple[list[str], str]:
    (tmp / "runs").write_text("")  # the default folder runs/<date>/<time> cannot be made
    return [], "cannot create the run folder runs/"


def _read_only_folder(tmp: Path, request) -> tuple[list[str], str]:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o500)
    request.addfinalizer(lambda: (tmp / "ro").chmod(0o700))
    return [f"hydra.run.dir={tmp / 'ro' / 'run'}"], "(Permission denied)"


def _finished_run(tmp: Path, request) -> tuple[list[str], str]:
    run = request.getfixturevalue("tiny_run")
    return [f"hydra.run.dir={run}"], f"run folder {run} already holds a run (checkpoints/, result.json, " \
                                     f"TensorBoard events); start this run in a new folder"


def _folder_in_use(tmp: Path, request) -> tuple[list[str], str]:
    (tmp / "busy").mkdir()
    fd = os.open(tmp / "busy", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a ppo-train running there holds it
    request.addfinalizer(lambda: os.close(fd))
    return [f"hydra.run.dir={tmp / 'busy'}"], "is in use by another ppo-train that is still running"


def _seed(value: int):
    return lambda tmp, request: ([f"seed={value}"], f"seed={value}: must be in [0, 2**32 - 1]")


@pytest.mark.parametrize("setup", [_seed(-1), _seed(2**32), _bad_yaml, _file_in_the_way, _runs_is_a_file,
                                   _read_only_folder, _finished_run, _folder_in_use],
                         ids=["seed=-1", "seed=2**32", "yaml-syntax", "file-in-the-way", "runs-is-a-file",
                              "read-only-folder", "finished-run", "folder-in-use"])
def test_start_faults_are_one_line_and_leave_no_folder(tmp_path, request, setup):
    args, fragment = setup(tmp_path, request)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    proc = cli("ppo-train", *JOB, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    _one_line(proc.stderr, fragment)
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before  # nothing created, nothing rewritten (a finished run's .hydra/ record included)


def test_users_copy_of_a_preset_wins_over_the_packaged_one(tmp_path):
    conf = tmp_path / "conf"
    (conf / "env").mkdir(parents=True)
    (conf / "env" / "CartPole-v1.yaml").write_text("id: CartPole-v1\nnum_envs: 3\n")
    (conf / "hydra" / "sweeper").mkdir(parents=True)
    packaged = (ROOT / "ppo_cli" / "conf" / "hydra" / "sweeper" / "ppo_random.yaml").read_text()
    (conf / "hydra" / "sweeper" / "ppo_random.yaml").write_text(packaged + "n_trials: 1\n")
    proc = cli("ppo-train", "--config-dir", str(conf), "hydra/sweeper=ppo_random", "--cfg", "all", cwd=tmp_path,
               check=True)
    shown = yaml.safe_load(proc.stdout)
    assert shown["env"]["num_envs"] == 3 and shown["hydra"]["sweeper"]["n_trials"] == 1
    assert not list(tmp_path.glob("runs"))


# --- run folders (8, 10), the start banner (19, 20) -------------------------------------------------------------

def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_folder, "_FRESH", {})
    monkeypatch.setattr(run_folder, "_CREATED", [])
    first = run_folder.fresh_dir("runs/2026-01-01/10-00-00")
    assert run_folder.fresh_dir("runs/2026-01-01/10-00-00") == first  # Hydra asks more than once: the same answer
    run_folder._FRESH.clear()  # as other processes would
    second = run_folder.fresh_dir("runs/2026-01-01/10-00-00")
    run_folder._FRESH.clear()
    third = run_folder.fresh_dir("runs/2026-01-01/10-00-00")
    assert [first, second, third] == [f"runs/2026-01-01/10-00-00{s}" for s in ("", "_2", "_3")]
    assert all(Path(p).is_dir() for p in (first, second, third))


def test_three_runs_at_once_banner_async_and_no_train_log(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    args = [[*JOB, "algo.total_timesteps=200", "env.vectorization=async"], JOB, JOB]
    procs = [subprocess.Popen([sys.executable, "-m", "ppo_cli.cli.train", *a], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in args]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    folders = {Path(re.search(r"^run dir:\s+(\S+)", out, re.MULTILINE).group(1)) for out, _ in outs}
    assert len(folders) == 3 and all((f / "result.json").is_file() for f in folders)
    assert not list(tmp_path.rglob("train.log"))
    banner = outs[0][0]
    assert "env:        CartPole-v1 x 2 envs (async), seed 1\n" in banner
    assert re.search(r"^device:     cpu \(auto: .+\), 1 torch thread$", banner, re.MULTILINE), banner
    assert "algo.n_steps 64 x env.num_envs 2 = 128 steps per update" in banner
    assert ("training:   256 steps = 2 updates of 128 (algo.total_timesteps=200 is not a whole number of rollouts: "
            "the run stops after the update that reaches it)") in banner


# --- write failures during a run (9) ----------------------------------------------------------------------------

def test_disk_full_mid_run_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    # The third checkpoint write fails as on a full disk (the first two are updates 1 and 2).
    (hook / "sitecustomize.py").write_text(
        "import errno, torch\n"
        "_save, _calls = torch.save, []\n"
        "def save(*args, **kwargs):\n"
        "    _calls.append(1)\n"
        "    if len(_calls) == 3:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return _save(*args, **kwargs)\n"
        "torch.save = save\n")
    run = tmp_path / "run"
    proc = cli("ppo-train", *JOB, "algo.total_timesteps=1024", f"hydra.run.dir={run}", cwd=tmp_path,
               env={"PYTHONPATH": f"{hook}:{ROOT}"})
    assert proc.returncode == 2
    _one_line(proc.stderr, f"cannot write checkpoint {run / 'checkpoints' / 'checkpoint.pt'} (No space left on "
                           f"device); the previous checkpoint.pt, if any, is kept")
    assert checkpoint.load(run / "checkpoints" / "checkpoint.pt")["global_step"] == 256
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint.pt"]


def test_torch_write_failure_names_the_file_and_the_os_reason(tmp_path, monkeypatch):
    minimal = {"config_yaml": "a: 1", "observation_space": {}, "action_space": {}, "policy": {}}
    path = checkpoint.save({**minimal, "global_step": 1}, tmp_path / "c.pt")

    def enforce_fail(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 15040 vs 14992")

    class Full:
        f_bavail = 0

    monkeypatch.setattr(torch, "save", enforce_fail)
    monkeypatch.setattr(os, "statvfs", lambda _: Full())
    with pytest.raises(UserError) as err:
        checkpoint.save({**minimal, "global_step": 2}, path)
    assert str(err.value) == (f"cannot write checkpoint {path} ({os.strerror(errno.ENOSPC)}); the previous c.pt, if "
                              f"any, is kept")
    assert isinstance(err.value, OSError)  # still an OSError for callers that catch those
    monkeypatch.undo()
    assert checkpoint.load(path)["global_step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_event_file_write_failure_is_one_error_without_a_thread_traceback(tmp_path, capfd):
    run = tmp_path / "run"
    logger = Logger(run, 100, 0, "a: 1", rich_progress=False)
    logger.scalars(1, {"x": 1.0})
    logger.writer.flush()
    for f in run.iterdir():
        f.unlink()
    run.rmdir()
    run.write_text("in the way")  # the folder is gone: TensorBoard's writer thread fails at its next write
    with pytest.raises(UserError, match=rf"cannot write TensorBoard events into {re.escape(str(run))} "
                                        rf"\(Not a directory\)"):
        for step in range(2, 200):
            logger.writer.file_writer.event_writer._async_writer._worker._next_flush_time = 0
            logger.scalars(step, {"x": 1.0})
            time.sleep(0.01)
    logger.close()  # quiet: the failure was reported
    assert "Traceback" not in capfd.readouterr().err


# --- sweeps (21) and ppo-sweep-report (12) ---------------------------------------------------------------------

def test_sweep_summary_and_exit_code(tmp_path):
    sweep = tmp_path / "sweep"
    proc = cli("ppo-train", "-m", "algo.batch_size=32,100", *JOB, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert re.search(r"^sweep: 2 jobs, 1 done, 1 failed; best objective -?\d+\.\d\d \(job 0\)$", proc.stdout,
                     re.MULTILINE), proc.stdout
    assert f"ppo-sweep-report {sweep}" in proc.stdout
    again = cli("ppo-train", "-m", "seed=1,2", *JOB, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert again.returncode == 2
    _one_line(again.stderr, f"sweep folder {sweep} already holds a sweep (jobs 0, 1)")


@pytest.mark.parametrize("sweeper", [[], pytest.param(["hydra/sweeper=ppo_random", "hydra.sweeper.n_trials=2"],
                                                      marks=pytest.mark.slow)], ids=["grid", "optuna"])
def test_sweep_where_every_job_failed_exits_1(tmp_path, sweeper):
    sweep = tmp_path / "sweep"
    grid = [] if sweeper else ["algo.clip_range=0.1,0.2"]
    proc = cli("ppo-train", "-m", *sweeper, *grid, "seed=-1", *JOB, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert errors[-1] == (f"ppo-train: error: every job of the sweep failed (see each job's result.json in "
                          f"{sweep})"), proc.stderr
    assert sum("seed=-1: must be in" in ln for ln in errors) == 2 and "Traceback" not in proc.stderr
    assert "sweep: 2 jobs, 0 done, 2 failed" in proc.stdout
    assert "alembic" not in proc.stdout + proc.stderr


def _fake_sweep(tmp: Path, broken: bool = True) -> Path:
    sweep = tmp / "sweep"
    for name in ("0", "1", "2"):
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / "result.json").write_text(json.dumps({"status": "ok", "objective": 10.0 + int(name),
                                                              "global_step": 256, "wall_time": 1.0,
                                                              "overrides": [f"seed={name}"]}))
    if broken:
        (sweep / "1" / "result.json").write_bytes(b'{"status": "ok", "objective": \xff}')
        (sweep / "2" / "result.json").write_text("[1, 2]")
    return sweep


def test_sweep_report_warns_once_per_unreadable_result(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path)
    sweep_report.main([str(sweep)])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert lines == [f"ppo-sweep-report: warning: {sweep / '1' / 'result.json'} is not UTF-8 text; job 1 counts as "
                     f"failed",
                     f"ppo-sweep-report: warning: {sweep / '2' / 'result.json'} holds a JSON list, not an object; "
                     f"job 2 counts as failed"]
    assert "3 jobs, ranked by objective" in out and (sweep / "summary.csv").is_file()


def test_sweep_report_into_an_unwritable_folder_is_one_line(tmp_path, capsys):
    sweep = _fake_sweep(tmp_path, broken=False)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as stop:
        sweep_report.main([str(sweep), "--out", str(tmp_path / "afile" / "report")])
    assert stop.value.code == 2
    out = tmp_path / "afile" / "report"
    _one_line(capsys.readouterr().err, f"cannot write the report into {out} (Not a directory); choose another folder "
                                       f"with --out DIR", tool="ppo-sweep-report")


def test_a_checkpoint_whose_env_recipe_runs_code_is_refused_on_resume(tiny_run, tmp_path):
    """Issue 19, item 1: env.entry_point: subprocess:Popen in a checkpoint's config ran a shell command."""
    import torch

    marker = tmp_path / "pwned"
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    data = torch.load(ckpt, weights_only=True)
    evil = data["config_yaml"].replace("entry_point: null", "entry_point: subprocess:Popen")
    evil = evil.replace("kwargs: {}", f"kwargs: {{args: ['touch', '{marker}']}}")
    evil = evil.replace("trust_env_code: false", "trust_env_code: true")  # a checkpoint cannot vouch for itself
    assert "subprocess:Popen" in evil and "trust_env_code: true" in evil
    torch.save({**data, "config_yaml": evil}, ckpt)
    proc = cli("ppo-train", f"resume={ckpt}", cwd=tmp_path)
    assert proc.returncode == 2 and not marker.exists()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "env.entry_point=subprocess:Popen (is subprocess.Popen" in lines[0]
    assert "trust_env_code=true" in lines[0]


def test_float64_action_bounds_and_scalar_observations(tmp_path):
    """Issue 19, item 14: a float64 Box action clipped in float32 landed outside 0.1; a shape () Box observation
    crashed the policy. The env asserts space.contains on every action (std 1 samples mostly fall outside)."""
    proc = cli("ppo-train", *TINY, "env.entry_point=tests.custom_env:StrictFloat64", "eval.every_steps=128",
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_resume_with_nothing_left_to_train_says_so(tiny_run, tmp_path):
    """Issue 30, item 12: resuming at or past algo.total_timesteps exited 0 having done nothing."""
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    proc = cli("ppo-train", f"resume={ckpt}", cwd=tmp_path)
    assert proc.returncode == 2
    _one_line(proc.stderr, f"{ckpt} is at step 256, already at or past algo.total_timesteps=256: nothing to train; "
                           f"set a larger algo.total_timesteps to train on")


def test_the_banner_names_the_preset_and_the_wrappers_around_its_env(tmp_path):
    """Issue 30, item 12: env=CartPoleNoVel-v1 was announced as 'env: CartPole-v1'."""
    proc = cli("ppo-train", "env=CartPoleNoVel-v1", *JOB, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "env:        CartPoleNoVel-v1 (CartPole-v1 + KeepObservationIndices) x 2 envs" in proc.stdout


@pytest.mark.parametrize("args", [["algo.n_steps=1000000000000"], ["env.num_envs=1000000000"]])
def test_a_rollout_larger_than_the_machine_is_one_line_before_anything_is_built(args, tmp_path):
    """Issue 30, item 11: n_steps 1e12 ended in the allocator's traceback, num_envs 1e9 in a silent hang."""
    proc = cli("ppo-train", *args, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    _one_line(proc.stderr, "steps needs about ")
    assert "of memory available on cpu; lower algo.n_steps or env.num_envs" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing left behind


def test_the_exact_rollout_size_is_checked_once_the_spaces_are_known(monkeypatch):
    """The lower bound passes an Atari rollout that the frames' real size does not fit: PPO refuses it."""
    from ppo_cli import devices
    from ppo_cli.algo.storage import rollout_bytes
    from ppo_cli.errors import UserError
    from ppo_cli.run.runner import Runner

    needed = rollout_bytes(128, 2, (4, 84, 84), torch.uint8, (), torch.int64)
    assert needed == 128 * 2 * (4 * 84 * 84 + 8 + 32)  # frames, action, 8 float32 columns
    monkeypatch.setattr(devices, "available_memory", lambda device: needed - 1)
    cfg = make_cfg("env=Breakout", "network=cnn", "algo=ppo_atari", "env.num_envs=2", "algo.n_steps=128")
    with pytest.raises(UserError, match=r"the rollout of algo.n_steps 128 x env.num_envs 2 steps needs about 7.2 MB"):
        Runner(cfg, Path("unused"), rich_progress=False)
