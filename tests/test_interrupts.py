"""Stopping a run (issue 19, items 3, 4, 5, 7): a signal anywhere checkpoints an update boundary and resuming from it
equals not stopping, bit for bit; a second signal ends the process at once and keeps the last checkpoint; async
env workers leave signals to the trainer; resume edge cases (another device's generator, another env.num_envs,
envs that cannot be saved) are defined and said in one note."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_cli.envs.make import make_vec_env
from ppo_cli.run import checkpoint
from ppo_cli.run.evaluation import PeriodicEvaluator
from ppo_cli.run.runner import Interrupted, Runner

from .conftest import ROOT, make_cfg
from .signal_envs import SignalAt

BASE = ["env.entry_point=tests.signal_envs:SignalAt", "env.max_episode_steps=200", "env.num_envs=4",
        "algo.n_steps=32", "algo.batch_size=32", "algo.total_timesteps=512", "algo.lr_schedule=linear",
        "eval.final=false", "eval.every_steps=0", "eval.objective=train", "checkpoint_interval=0"]
NORMALIZED = ["env.normalize_obs=true", "env.normalize_reward=true"]
LSTM = ["network.recurrent=lstm", "network.rnn_hidden=16", "network.net_arch=[16]"]


@pytest.fixture
def signals_fail_the_test():
    """A signal the trainer does not take fails the test instead of ending pytest."""
    def reached(signum, _frame):
        raise AssertionError(f"{signal.Signals(signum).name} reached the test: the trainer did not handle it")

    previous = {s: signal.signal(s, reached) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _run(overrides, run_dir, resume=None, armed=False, patch=None):
    """Train in this process; (the trainer, the Interrupted it raised or None)."""
    SignalAt.armed = armed
    trainer = Runner(make_cfg(*overrides), run_dir, resume=resume, rich_progress=False)
    if patch is not None:
        patch(trainer)
    try:
        trainer.run()
        return trainer, None
    except Interrupted as exc:
        return trainer, exc
    finally:
        SignalAt.armed = False
        trainer.close()


def _assert_same_training(a: Runner, b: Runner) -> None:
    for (name, x), y in zip(a.algo.policy.state_dict().items(), b.algo.policy.state_dict().values(), strict=True):
        assert torch.equal(x, y), name  # parameters and observation statistics
    for sa, sb in zip(a.algo.optimizer.state_dict()["state"].values(), b.algo.optimizer.state_dict()["state"].values(),
                      strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    if a.algo.reward_scaler is not None:
        assert a.algo.reward_scaler.state_dict()["var"] == b.algo.reward_scaler.state_dict()["var"]
    assert a.global_step == b.global_step and a.update_idx == b.update_idx


def _split_and_resume(overrides, tmp_path, patch=None, armed=True):
    """Stop a run (by SignalAt or by `patch`), resume it from its checkpoint, and compare with a straight run."""
    straight, _ = _run(overrides, tmp_path / "straight")
    _, stop = _run(overrides, tmp_path / "split", armed=armed, patch=patch)
    assert stop is not None, "the run was not interrupted"
    data = checkpoint.load(stop.path)
    assert data["global_step"] == stop.step
    resumed, again = _run(overrides, tmp_path / "split", resume=data)
    assert again is None
    _assert_same_training(straight, resumed)
    return stop, data


@pytest.mark.parametrize("sig,extra", [(signal.SIGINT, []), (signal.SIGTERM, NORMALIZED), (signal.SIGINT, LSTM)],
                         ids=["sigint", "sigterm-normalized", "sigint-lstm"])
def test_a_signal_mid_rollout_checkpoints_the_rollouts_start_and_resumes_bitwise(tmp_path, capfd, sig, extra,
                                                                                  signals_fail_the_test):
    # The first env's 40th step is the second rollout's 8th (steps 128-255): the rollout is dropped after that
    # step, and the checkpoint is the state at its start, step 128, with the first env's step counter at 32.
    overrides = [*BASE, *extra, f"++env.kwargs.signum={int(sig)}"]
    stop, data = _split_and_resume(overrides, tmp_path)
    assert stop.step == 128 and data["update"] == 1 and stop.signum == sig
    assert data["env_state"][1][0][-1]["steps"] == 32  # the innermost layer of env 0: SignalAt itself
    err = capfd.readouterr().err
    assert (f"ppo-train: {sig.name}: stopping after the env step in progress; the rollout is dropped and the "
            f"checkpoint holds step 128") in err


def test_a_signal_during_an_update_stops_after_it(tmp_path, capfd, signals_fail_the_test):
    def signal_in_second_update(trainer):
        update = trainer.algo.updater.update

        def update_then_signal(*args):
            if trainer.update_idx == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return update(*args)

        trainer.algo.updater.update = update_then_signal

    stop, data = _split_and_resume(BASE, tmp_path, patch=signal_in_second_update, armed=False)
    assert stop.step == 256 and data["update"] == 2
    assert "ppo-train: SIGINT: stopping after this update (about " in capfd.readouterr().err


def test_a_signal_during_a_periodic_evaluation_abandons_it(tmp_path, signals_fail_the_test):
    overrides = [*BASE, "eval.every_steps=256", "eval.episodes=2"]

    def signal_in_evaluation(trainer):
        evaluate = trainer.evaluator.evaluate

        def signal_then_evaluate(step):
            os.kill(os.getpid(), signal.SIGTERM)
            return evaluate(step)

        trainer.evaluator.evaluate = signal_then_evaluate

    stop, data = _split_and_resume(overrides, tmp_path, patch=signal_in_evaluation, armed=False)
    assert stop.step == 256 and stop.signum == signal.SIGTERM
    # Nothing of the abandoned evaluation was kept: the resumed run's first evaluation (step 512) made best.pt.
    assert data["best_eval"] is None
    assert checkpoint.load(tmp_path / "split" / "checkpoints" / "best.pt")["eval"]["global_step"] == 512


def test_an_evaluation_abandoned_in_the_middle_of_an_async_step_closes_without_a_word():
    # A signal can land while the evaluation envs' workers are computing a step: abandon() kills them, and the
    # async env must not then wait for (and read the dead pipes for) the answer to that step (an EOFError, exit 1).
    cfg = make_cfg("env.entry_point=tests.signal_envs:HangAt", "+env.kwargs.at=1", "env.vectorization=async",
                   "env.num_envs=2", "eval.episodes=2")
    evaluator = PeriodicEvaluator(cfg, None, torch.device("cpu"), print)  # type: ignore[arg-type]
    evaluator.envs = make_vec_env(cfg.env, seed=0, num_envs=2)
    evaluator.envs.reset(seed=0)
    processes = list(evaluator.envs.unwrapped.processes)
    evaluator.envs.unwrapped.step_async(np.zeros(2, dtype=np.int64))  # its first step never returns
    for p in processes:  # as abandon() kills them; dead before the close reads their pipes, as on a busy machine
        p.kill()
        p.join()
    evaluator.abandon()
    assert evaluator.envs is None and not any(p.is_alive() for p in processes)


def test_the_uninterrupted_path_takes_no_signal_handler_with_it(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    trainer, _ = _run(BASE, tmp_path / "run")
    assert signal.getsignal(signal.SIGINT) is previous and trainer.global_step == 512


# --- resume edge cases (item 7) ------------------------------------------------------------------------------


def _first_half(overrides, tmp_path):
    trainer, _ = _run([*overrides, "algo.total_timesteps=256"], tmp_path / "first")
    return trainer, checkpoint.load(tmp_path / "first" / "checkpoints" / "checkpoint.pt")


def test_a_generator_state_of_another_device_is_reseeded_with_a_note(tmp_path):
    _, data = _first_half(BASE, tmp_path)
    data["rng"] = torch.zeros(16, dtype=torch.uint8)  # the size of a CUDA generator's state, not a CPU one's
    resumed, stop = _run(BASE, tmp_path / "first", resume=data)
    assert stop is None and resumed.global_step == 512
    notes = [n for n in resumed.notes if "generator" in n]
    assert len(notes) == 1 and "saved on another device type than cpu" in notes[0]
    assert "minibatch shuffles (and the parameters) from here differ" in notes[0]


def test_another_num_envs_on_resume_restarts_the_episodes_and_keeps_the_reward_statistics(tmp_path):
    overrides = [*BASE, "env.normalize_reward=true"]
    _, data = _first_half(overrides, tmp_path)
    saved = data["reward_scaler"]
    assert saved["returns"].shape == (4,) and saved["returns"].abs().sum() > 0
    trainer = Runner(make_cfg(*overrides, "env.num_envs=2"), tmp_path / "first", resume=data, rich_progress=False)
    try:
        assert trainer.algo.reward_scaler.returns.tolist() == [0.0, 0.0]
        assert (trainer.algo.reward_scaler.mean, trainer.algo.reward_scaler.var) == (saved["mean"], saved["var"])
        notes = [n for n in trainer.notes if "restart from a reset" in n]
        assert notes == ["note: episodes in progress at the checkpoint restart from a reset (env.num_envs is 2, the "
                         "checkpoint's 4); env.normalize_reward keeps its statistics and restarts its per-env "
                         "discounted returns"]
        trainer.run()
        assert trainer.global_step == 256 + 2 * 32 * 4
    finally:
        trainer.close()


def test_envs_that_cannot_be_saved_restart_the_reward_scalers_returns_too(tmp_path):
    overrides = [*(o for o in BASE if not o.startswith("env.entry_point")),
                 "env.entry_point=tests.signal_envs:Unsaveable", "env.normalize_reward=true"]
    _, data = _first_half(overrides, tmp_path)
    assert data["env_state"] is None and data["reward_scaler"]["returns"].abs().sum() > 0
    trainer = Runner(make_cfg(*overrides), tmp_path / "first", resume=data, rich_progress=False)
    try:
        assert not trainer.algo.reward_scaler.returns.any()
        assert trainer.algo.reward_scaler.count == data["reward_scaler"]["count"]
        assert any("Unsaveable.connection" in n and "restarts its per-env discounted returns" in n
                   for n in trainer.notes)
    finally:
        trainer.close()


# --- in a subprocess, as a user stops it (items 4 and 5) ------------------------------------------------------

QUICK = ["env.num_envs=2", "algo.n_steps=64", "algo.batch_size=32", "eval.every_steps=0", "eval.final=false",
         "eval.objective=train"]


def _spawn(args, cwd):
    """ppo-train in a session of its own, so that os.killpg reaches it and its env workers, as Ctrl-C in a terminal
    or Slurm would, and nothing else."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "ppo_cli.cli.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_checkpoint(path: Path, proc, step: int | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists() or (step is not None and checkpoint.load(path)["global_step"] < step):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.1)


def _ours(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return err.strip().splitlines()


def _group_is_gone(pgid: int, timeout: float = 5) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_second_ctrl_c_ends_a_run_whose_env_hangs_and_keeps_the_last_checkpoint(tmp_path):
    # One env, 64 steps per update: checkpoints at steps 64 and 128, then the env's 150th step never returns.
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint.pt"
    proc = _spawn([*QUICK, "env.num_envs=1", "env.entry_point=tests.signal_envs:HangAt", "env.kwargs.at=150",
                   "algo.total_timesteps=100000", "checkpoint_interval=1", f"hydra.run.dir={tmp_path / 'run'}"],
                  tmp_path)
    _wait_for_checkpoint(ckpt, proc, step=128)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None  # the first Ctrl-C waits for the step in progress, which never ends
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 5
    first, second = _ours(err)
    assert first.startswith("ppo-train: SIGINT: stopping after the env step in progress")
    assert second == (f"ppo-train: stopped at once by a second SIGINT; the last checkpoint is kept: {ckpt} (step 128); "
                      f"resume with: ppo-train resume={ckpt}")
    assert checkpoint.load(ckpt)["global_step"] == 128
    assert not list(ckpt.parent.glob(".*.tmp"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_async_env_workers_leave_signals_to_the_trainer(tmp_path, sig):
    # The signal goes to the whole process group (a terminal's Ctrl-C, Slurm): the trainer, its async training env
    # workers (started before training) and its async evaluation env workers (started during training).
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "checkpoint.pt"
    args = [*QUICK, "env.vectorization=async", "checkpoint_interval=1", "eval.every_steps=256", "eval.episodes=2"]
    proc = _spawn([*args, "algo.total_timesteps=100000", f"hydra.run.dir={run}"], tmp_path)
    _wait_for_checkpoint(ckpt, proc, step=512)  # after the second evaluation: its workers run
    os.killpg(proc.pid, sig)
    t0 = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert time.time() - t0 < 15  # it used to hang 40 s with evaluation on
    *notice, last = _ours(err)
    assert len(notice) <= 1 and all(n.startswith(f"ppo-train: {sig.name}: stopping ") for n in notice)
    data = checkpoint.load(ckpt)
    step = data["global_step"]
    assert last == (f"ppo-train: interrupted by {sig.name}; checkpoint at step {step:,} (an update boundary) saved to "
                    f"{ckpt}; resume with: ppo-train resume={ckpt}")
    assert step % 128 == 0 and _group_is_gone(proc.pid)  # no worker outlived the run
    resumed, stop = _run([*args, f"algo.total_timesteps={step + 128}"], run, resume=data)
    assert stop is None and resumed.global_step == step + 128


def test_ctrl_c_during_the_final_evaluation_stops_it_and_keeps_the_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint.pt"
    proc = _spawn([*QUICK, "algo.total_timesteps=256", "checkpoint_interval=0", "eval.final=true",
                   "eval.episodes=100000", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    _wait_for_checkpoint(ckpt, proc)  # the one checkpoint, written just before the final evaluation
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 15
    assert _ours(err) == [f"ppo-train: interrupted by SIGINT during the final evaluation; the run is trained (step "
                          f"256) and its checkpoint is kept: {ckpt} (ppo-eval {ckpt} evaluates it)"]
    assert checkpoint.load(ckpt)["global_step"] == 256


@pytest.mark.slow  # waits out a slow start; timing-bound under load
def test_ctrl_c_while_the_run_starts_is_one_line_and_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    proc = _spawn([*QUICK, "env.entry_point=tests.signal_envs:SlowStart", f"hydra.run.dir={run}"], tmp_path)
    assert proc.stdout.readline().startswith("run dir:")  # the banner: the env is being built (5 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert _ours(err) == ["ppo-train: interrupted by SIGINT while starting or closing the run; checkpoints already "
                          "written are kept"]
    assert not run.exists()


@pytest.mark.parametrize("tool", ["train", "evaluate", "sweep_report", "export"])
def test_ctrl_c_while_a_tool_imports_is_one_line(tool, tmp_path):
    """The console scripts' launcher: a SIGINT that lands while the tool's modules import (torch, Hydra: a second
    or more) is one line and exit 130, not a traceback through the imports. The signal is sent from inside the
    import call, so the test does not depend on timing."""
    # SIGINT as in a terminal: a process started with it ignored (an xdist worker's child) would never see it.
    code = ("import importlib, os, signal, sys\n"
            "sys.argv = [sys.argv[0], 'checkpoint.pt']  # an argument: help and usage errors are answered before\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from ppo_cli.cli import launch\n"
            "real = importlib.import_module\n"
            "def interrupted(name, *rest):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *rest)\n"
            "importlib.import_module = interrupted\n"
            f"launch.{tool}()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    prog = {"train": "ppo-train", "evaluate": "ppo-eval", "sweep_report": "ppo-sweep-report",
            "export": "ppo-export"}[tool]
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == f"{prog}: interrupted by SIGINT while starting; nothing was written\n"
    assert not list(tmp_path.iterdir())
