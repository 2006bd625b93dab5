"""The runner: drives an algorithm (algo/ppo.py's PPO) through collect -> learn -> log -> evaluate -> checkpoint until
total_timesteps.

It owns what ties a run together and is no algorithm's business: the envs, the step and update counters, stop
signals and the ranks' agreement on them (signals.py), checkpoints at update boundaries (the algorithm's state
plus the run's), periodic evaluation and best.pt, TensorBoard and the console, the objective. A second algorithm
plugs in by offering the same calls: collect, learn, own_state / buffers / shared_state, load_state_dict, prepare.
"""

from __future__ import annotations

import math
import os
import signal
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from ppo_cli import distributed
from ppo_cli.algo.ppo import PPO
from ppo_cli.algo.storage import check_rollout_fits
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.algo.update import STAT_NAMES, divergence_message
from ppo_cli.config import choice, env_label
from ppo_cli.devices import choose_device, keep_freed_memory, torch_threads
from ppo_cli.envs.agents import check_algorithm
from ppo_cli.envs.faults import EnvFault, count_steps, kill_workers, largest_reward, steps_taken
from ppo_cli.envs.make import make_vec_env, restorable, restore, snapshot
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import settle_network
from ppo_cli.policy.observations import batch_size
from ppo_cli.run import checkpoint
from ppo_cli.run.doctor import Doctor
from ppo_cli.run.evaluation import EvalResult, PeriodicEvaluator
from ppo_cli.run.logger import Logger, QuietLogger
from ppo_cli.run.signals import (
    EvaluationStopped,
    Interrupted,
    StopSignals,
    held_from_workers,
    notice,
    say,
    stop_signals,
)
from ppo_cli.run.stalls import Stalls

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
# Where training time goes; `storage` is the rollout loop's own time: conversions, buffer writes, episode
# bookkeeping, truncation bootstraps, reward scaling.
STAGES = ("env", "policy", "storage", "advantages", "update", "log_checkpoint")


class Diverged(UserError):
    """The update produced non-finite losses; parameters after it are garbage, so nothing more is saved."""


@dataclass
class Boundary:
    """What a rollout changes of the state at the update boundary it starts from: this process's part (the
    algorithm's own state and the envs') and the policy's buffers. Parameters and optimizer change only in learn."""

    own: dict[str, Any]
    buffers: dict[str, torch.Tensor]


@dataclass
class Member:
    """What a run trained as a member of a batch (run/batched.py) takes from the batch instead of building it: the
    batch's envs (its own are a slice of them), its first observations, the batch's clock and stop signals, and a
    label for its console lines."""

    envs: Any
    obs: Any
    info: dict[str, Any]
    clock: Stopwatch
    stops: StopSignals
    label: str


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    global_step: int
    wall_time: float  # training only; evaluation time is eval_seconds
    sps: float
    final_eval: EvalResult | None
    best_eval: dict[str, Any] | None  # summary of the best periodic evaluation, with its global_step
    eval_seconds: float
    stopped_at: tuple[int, float] | None  # (step, training seconds) where eval.stop_at_return was met, or pruned
    recent_return: float | None  # mean return of the last eval.train_window training episodes
    objective: float  # what eval.objective names: final eval, best eval or recent training return
    warnings: list[dict[str, Any]]  # the training doctor's (run/doctor.py), as result.json lists them
    pruned: bool = False  # a tuning sweep's job whose trial the study's pruner stopped (run/trial.py)


def hparams_of(cfg: DictConfig) -> dict[str, float | int | str | bool]:
    """The run's settings as flat scalars for TensorBoard's hparams (lists and nulls as strings)."""
    flat: dict[str, float | int | str | bool] = {}
    for group in ("algo", "network", "env"):
        for key, value in OmegaConf.to_container(cfg[group], resolve=True).items():  # type: ignore[union-attr]
            value = choice(value)  # type: ignore[assignment]
            if key in ("kwargs", "wrappers") and not value:
                continue
            ok = isinstance(value, (bool, int, float, str))
            flat[f"{group}.{key}"] = value if ok else str(value)
    flat["seed"] = int(cfg.seed)
    return flat


def episodes(rollout: Any, ranks: distributed.Ranks) -> tuple[list[float], list[int]]:
    """The returns and lengths of the episodes the rollout finished, over all ranks."""
    if not ranks.active:
        return rollout.returns, rollout.lengths
    gathered = distributed.gather((rollout.returns, rollout.lengths), ranks)
    return [r for rs, _ in gathered for r in rs], [n for _, ns in gathered for n in ns]


def nonfinite(scalars: dict[str, float]) -> list[str]:
    """The update statistics (STAT_NAMES) that are not finite."""
    return [k for k in STAT_NAMES if not math.isfinite(scalars[f"losses/{k}"])]


def check_finite(scalars: dict[str, float], step: int, envs: Any, normalize_reward: bool) -> None:
    """Diverged, in one line, where an update's statistics are not finite."""
    bad = nonfinite(scalars)
    if bad:
        raise Diverged(divergence_message(step, bad, largest_reward(envs), normalize_reward))


def process_setup(cfg: DictConfig) -> torch.device:
    """The process's threads and the run's device (network=auto decided first: both depend on the encoder), after
    the check that the env and algo.multi_agent go together."""
    check_algorithm(cfg.env, None if cfg.algo.multi_agent is None else choice(cfg.algo.multi_agent))
    settle_network(cfg)
    threads = torch_threads(cfg)
    if threads:
        torch.set_num_threads(threads)
        # numpy's BLAS pool too: N sweep jobs on N cores must not each start a thread per core.
        threadpool_limits(threads)
    device = choose_device(cfg).device
    if device.type == "cpu":
        keep_freed_memory()
    return device


class Runner:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume: dict[str, Any] | None = None,
                 rich_progress: bool | None = None, member: Member | None = None) -> None:
        self.cfg, self.run_dir, self.member = cfg, Path(run_dir), member
        self.device = process_setup(cfg)
        # Under torchrun: this process's rank; rank 0 alone evaluates and writes files (distributed.py).
        self.ranks = distributed.setup(self.device)
        torch.manual_seed(cfg.seed)  # the same initial parameters on every rank
        self.env_seed = cfg.seed + self.ranks.rank * cfg.env.num_envs  # each rank's envs are seeded apart
        self.stops = StopSignals(self.ranks, self._stop_notice, self._stop_at_once) if member is None else member.stops
        self._saved: tuple[Path, int] | None = None  # the last checkpoint.pt written (or resumed from), its step
        check_rollout_fits(cfg.algo.n_steps, cfg.env.num_envs, self.device)  # before a billion envs are built
        # Sync envs run in this process: a Ctrl-C while they are built is a KeyboardInterrupt, as anywhere outside
        # run(). Async workers must not see it (held_from_workers); it then stops the run at its first boundary.
        async_workers = cfg.env.vectorization == "async"
        with held_from_workers(self.stops.remember) if async_workers else nullcontext():
            self.envs = make_vec_env(cfg.env, seed=self.env_seed, training=True) if member is None else member.envs
        self.stalls = None if member is not None else Stalls(
            lambda: (self.envs, getattr(getattr(self, "evaluator", None), "envs", None)), tick=self._tick)
        try:
            self._build(cfg, resume, rich_progress)
        except BaseException:  # what was opened so far is closed; the error goes on to the user
            self.close(own_only=True)
            raise

    def _build(self, cfg: DictConfig, resume: dict[str, Any] | None, rich_progress: bool | None) -> None:
        m = self.member
        self.clock = Stopwatch(STAGES) if m is None else m.clock
        obs, info = self.envs.reset(seed=self.env_seed) if m is None else (m.obs, m.info)
        self.algo = PPO(cfg, self.envs, obs, info, self.device, self.ranks, self.clock, self._message)
        self.global_step, self.update_idx, self.trained_before = 0, 0, 0.0
        self.recent_returns: deque[float] = deque(maxlen=cfg.eval.train_window)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.notes: list[str] = []
        self.evaluator = PeriodicEvaluator(cfg, self.algo.policy, self.device, self._message)
        self.doctor = Doctor(cfg.doctor, cfg.algo, self.algo.action_space["type"] != "Box",
                             math.prod(self.algo.policy.action_shape), cfg.env.normalize_reward, cfg.env.normalize_obs)
        if resume is not None:
            self._restore(resume)
            if cfg.get("resume"):
                self._saved = (Path(cfg.resume), self.global_step)
        self._first_update = self.update_idx
        if m is None:  # a batch's member: its batch counts the steps, prepares the members, opens their loggers
            count_steps(self.envs, self.global_step, self.ranks.world)  # env faults name the steps as the run does
            self.notes += self.algo.prepare()
            self.open_logger(resume is not None, rich_progress)
        else:
            self.logger = QuietLogger()

    def open_logger(self, resumed: bool, rich_progress: bool | None = None) -> None:
        """TensorBoard and the console (rank 0's; a batch's member's once its batch is built)."""
        self.logger = QuietLogger() if not self.ranks.main else Logger(
            self.run_dir, self.cfg.algo.total_timesteps, self.global_step, self.config_yaml, self.cfg.log_interval,
            self.global_step if resumed else None, rich_progress if self.member is None else False, self.cfg,
            "" if self.member is None else self.member.label)

    @property
    def wall_time(self) -> float:  # seconds of training (evaluation excluded), including before a resume
        return self.trained_before + self.clock.total()

    def _message(self, text: str) -> None:
        self.logger.message(text)

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        total, stops = self.cfg.algo.total_timesteps, self.stops
        for note in self.notes:
            self.logger.message(note)
        stopped_at: tuple[int, float] | None = None
        try:
            with stop_signals(stops.handle):
                while self.global_step < total:
                    if stops.agreed():  # between updates: exactly where an uninterrupted run would be
                        raise Interrupted(stops.signal or signal.SIGTERM, self.global_step, self.save())
                    step0, time0 = self.global_step, self.clock.total()
                    start = None if self.ranks.active else self._boundary()
                    stops.phase = "rollout"
                    with kept_on_env_fault(self, start, step0):
                        rollout = self.algo.collect(self.envs, stops.requested, step0)
                    if stops.requested():  # one process, a signal: the rollout is dropped, its start saved
                        raise Interrupted(stops.signal, step0, self.save(at=start))  # type: ignore[arg-type]
                    stops.phase = "update"
                    scalars = self.algo.learn(progress=step0 / total)
                    if self.record(step0, time0, rollout, scalars):
                        stopped_at = (self.global_step, self.wall_time)
                        break
                path = self.save()
                if stops.agreed():  # asked during the last update: the run is trained, the evaluation waits
                    raise Interrupted(stops.signal or signal.SIGTERM, self.global_step, path)
                return self.conclude(path, stopped_at)
        finally:
            self.logger.close()

    def record(self, step0: int, time0: float, rollout: Any, scalars: dict[str, float]) -> bool:
        """Count, log, evaluate and checkpoint an update from step `step0` (begun at `time0` on the clock) that
        collected `rollout`; True where the run stops here (eval.stop_at_return reached, or a pruned trial)."""
        self.global_step += rollout.steps * self.ranks.world
        returns, lengths = episodes(rollout, self.ranks)
        check_finite(scalars, self.global_step, self.envs, self.cfg.env.normalize_reward)
        self.update_idx += 1
        self.recent_returns.extend(returns)
        self.stops.phase = None
        with self.clock["log_checkpoint"]:
            self._log(scalars, (self.global_step - step0) / max(self.clock.total() - time0, 1e-9), returns, lengths)
        with kept_on_env_fault(self, None, self.global_step):  # an evaluation env that breaks
            if self._evaluate_due(step0):
                return True
        # After the evaluation, so the checkpoint's best_eval is never older than best.pt.
        if self.cfg.checkpoint_interval and self.update_idx % self.cfg.checkpoint_interval == 0:
            with self.clock["log_checkpoint"]:
                self.save()
        return False

    def conclude(self, path: Path, stopped_at: tuple[int, float] | None) -> TrainResult:
        """The final evaluation of the run saved at `path`, and its result."""
        return self._finish(path, self._final_evaluation(path), stopped_at)

    def _log(self, scalars: dict[str, float], sps: float, returns: list[float], lengths: list[int]) -> None:
        scalars = {**scalars, "charts/SPS": sps}
        if returns:
            scalars["charts/episodic_return"] = float(np.mean(returns))
            scalars["charts/episodic_length"] = float(np.mean(lengths))
        self.logger.scalars(self.global_step, scalars)
        self.logger.warnings(self.doctor.update(self.global_step, scalars, returns, lengths))
        mean_ret = float(np.mean(self.recent_returns)) if self.recent_returns else None
        self.logger.update_done(self.update_idx, self.global_step, sps, mean_ret)

    # --- evaluation -------------------------------------------------------------------------------------
    def _evaluate_due(self, step0: int) -> bool:
        """A periodic evaluation where one is due: rank 0 evaluates, then every rank gives its part of the state
        to best.pt on a new best, and all learn whether eval.stop_at_return is reached (returned). A stop already
        asked for skips it (one process; the ranks all evaluate or not)."""
        if not self.evaluator.due(step0, self.global_step) or self.stops.requested():
            return False
        result, improved = self._periodic_evaluation() if self.ranks.main else (None, False)
        distributed.wait_for_main(self.ranks)  # the others wait as long as the evaluation takes, not TIMEOUT
        if distributed.any_true(improved, self.ranks):
            # Every rank's part, as in checkpoint.pt, so that best.pt resumes under torchrun as checkpoint.pt does.
            best = {**self.state(), "eval": self.evaluator.best}
            if self.ranks.main:
                checkpoint.save(best, self.run_dir / "checkpoints" / BEST_NAME)
        reached = False
        if result is not None:
            self.logger.scalars(self.global_step, self.evaluator.report(self.global_step, result, improved))
            self.logger.warnings(self.doctor.evaluation(self.global_step, result.mean_return))
            why = self.evaluator.stop_reason(self.global_step, result)
            if why:
                self.logger.message(f"stopping: {why} at step {self.global_step:,} after {self.wall_time:.1f} s of "
                                    f"training")
            reached = why is not None
        return distributed.any_true(reached, self.ranks)

    def _periodic_evaluation(self) -> tuple[EvalResult | None, bool]:
        """Evaluate; (the result, whether it is the best so far). A stop signal abandons it: (None, False), the best
        so far kept."""
        best = self.evaluator.best
        try:
            with self.stops.evaluation():
                return self.evaluator.periodic(self.global_step)
        except EvaluationStopped:
            self.evaluator.best = best
            self.evaluator.abandon()
            return None, False

    def _final_evaluation(self, path: Path) -> EvalResult | None:
        if not (self.cfg.eval.final and self.ranks.main) or self.evaluator.pruned:  # a pruned trial: no more
            return None
        try:
            with self.stops.evaluation():
                return self.evaluator.evaluate(self.global_step)
        except EvaluationStopped:
            self.evaluator.abandon()
            raise Interrupted(self.stops.signal, self.global_step, path,  # type: ignore[arg-type]
                              in_final_eval=True) from None

    def _finish(self, path: Path, final_eval: EvalResult | None, stopped_at: tuple[int, float] | None) -> TrainResult:
        best = self.evaluator.best
        recent = float(np.mean(self.recent_returns)) if self.recent_returns else None
        objective = {"final": final_eval.mean_return if final_eval else None,
                     "best": best["mean_return"] if best else None,
                     "train": recent}[choice(self.cfg.eval.objective)]
        objective = float("nan") if objective is None else float(objective)
        sps = self.global_step / max(self.wall_time, 1e-9)
        metrics = {"hparam/objective": objective, "hparam/sps": sps}
        if final_eval is not None:
            metrics["hparam/final_return"] = final_eval.mean_return
        self.logger.hparams(hparams_of(self.cfg), metrics, self.global_step)
        return TrainResult(self.run_dir, path, self.global_step, self.wall_time, sps, final_eval, best,
                           self.evaluator.seconds, stopped_at, recent, objective,
                           [w.as_dict() for w in self.doctor.warnings], self.evaluator.pruned)

    # --- checkpoint state -------------------------------------------------------------------------------
    def _own_state(self) -> dict[str, Any]:
        """This process's own part of the state: the algorithm's and the envs' (checkpoint.STATE_KEYS)."""
        # A batch's member: its envs are a slice of the batch's, which a run of its own could not continue.
        return {**self.algo.own_state(), "env_state": None if self.member else snapshot(self.envs)[0]}

    def _boundary(self) -> Boundary:
        """The state a rollout is about to change, for a stop that drops the rollout (Boundary)."""
        return Boundary(self._own_state(), self.algo.buffers())

    def state(self, at: Boundary | None = None) -> dict[str, Any]:
        """The training state (checkpoint.STATE_KEYS): rank 0's own part at the top level, the other ranks' in
        `ranks` (gathered: every rank calls this at the same point). `at`: of the rollout in progress's start."""
        own = self._own_state() if at is None else at.own
        others = distributed.others_parts(own, self.algo.policy, self.ranks)
        return {
            "config_yaml": self.config_yaml,
            "observation_space": self.algo.obs_space,
            "action_space": self.algo.action_space,
            **self.algo.shared_state(None if at is None else at.buffers),
            "global_step": self.global_step,
            "update": self.update_idx,
            **own,
            "world_size": self.ranks.world,
            "ranks": others,
            "recent_returns": list(self.recent_returns),
            "wall_time": self.wall_time,
            "best_eval": self.evaluator.best,
            "doctor": self.doctor.state(),
        }

    def _restore(self, data: dict[str, Any]) -> None:
        checkpoint.check_resumable(data, self.ranks.world, (self.algo.obs_space, self.algo.action_space),
                                   env_label(self.cfg.env))
        if self.ranks.rank > 0:  # this rank's own part of the state
            data = {**data, **data["ranks"][self.ranks.rank - 1]}
        self.global_step, self.update_idx = int(data["global_step"]), int(data.get("update", 0))
        self.trained_before = float(data.get("wall_time", 0.0))
        self.recent_returns.extend(data.get("recent_returns", []))
        self.evaluator.best = data.get("best_eval")
        self.doctor.load(data.get("doctor"))
        env_state, last_obs = data.get("env_state"), data.get("last_obs")
        saved_envs = None if last_obs is None else batch_size(last_obs)
        continues = (restorable(self.envs, env_state) and saved_envs == self.envs.num_envs and self.member is None
                     and (self.algo.masks is None) == (data.get("last_mask") is None))
        self.notes += self.algo.load_state_dict(data, continues)
        if continues:
            restore(self.envs, env_state)
            return
        if self.member is not None:
            why = "a batch's member plays in the batch's envs, which its batch resets"
        elif saved_envs is not None and saved_envs != self.envs.num_envs:
            why = f"env.num_envs is {self.envs.num_envs}, the checkpoint's {saved_envs}"
        elif env_state is not None and not restorable(self.envs, env_state):
            why = "the checkpoint's envs were vectorized otherwise (env.vectorization)"
        else:
            why = snapshot(self.envs)[1] or "the checkpoint holds no env state"
        scaler = ("; env.normalize_reward keeps its statistics and restarts its per-env discounted returns"
                  if self.algo.reward_scaler is not None else "")
        self.notes.append(f"note: episodes in progress at the checkpoint restart from a reset ({why}){scaler}")
        if self.member is None:
            obs, info = self.envs.reset(seed=self.env_seed + self.global_step)
            self.algo.start(self.envs, obs, info, self.global_step)

    def save(self, name: str = CHECKPOINT_NAME, at: Boundary | None = None) -> Path:
        """Write a checkpoint (rank 0; the other ranks give it their state): every rank calls this together.
        `at`: of the state at the start of the rollout in progress (Runner.state)."""
        state = self.state(at=at)
        path = self.run_dir / "checkpoints" / name
        if not self.ranks.main:
            return path
        checkpoint.save(state, path)
        if name == CHECKPOINT_NAME:
            self._saved = (path, int(state["global_step"]))
        return path

    # --- signals ----------------------------------------------------------------------------------------
    def _tick(self) -> None:
        """The console's progress inside an update, from the steps the envs have taken (Stalls' thread)."""
        if self.stops.phase and getattr(self, "logger", None) is not None:
            self.logger.live(steps_taken(self.envs) or self.global_step, self.update_idx, self.stops.phase)

    def _stop_notice(self, signum: int) -> str:
        seconds = self.clock.seconds["advantages"] + self.clock.seconds["update"]
        return notice(signum, self.stops.phase, self.ranks.active, self.global_step,
                      self.update_idx - self._first_update, seconds)

    def _stop_at_once(self, signum: int) -> None:
        """End the process now (an env step that never returns, a long update): the last checkpoint written is
        complete (checkpoint.save is atomic) and stays; a write in progress leaves only a temporary file."""
        if self._saved is None:
            kept = "this run wrote no checkpoint yet"
        else:
            path, step = self._saved
            kept = f"the last checkpoint is kept: {path} (step {step:,}); resume with: ppo-train resume={path}"
        say(f"ppo-train: stopped at once by a second {signal.Signals(signum).name}; {kept}")
        for envs in (self.envs, self.evaluator.envs):
            kill_workers(envs)
        os._exit(128 + signum)

    def close(self, own_only: bool = False) -> None:
        """Close what the run opened (a batch's member: not the batch's envs)."""
        if self.stalls is not None:
            self.stalls.close()
        if self.member is None:
            self.envs.close()
        if not own_only:
            self.evaluator.close()
        distributed.teardown()


@contextmanager
def kept_on_env_fault(runner: Runner, at: Boundary | None, step: int) -> Iterator[None]:
    """An env that breaks inside (one process, after an update): the runner's state `at` (None: now) is saved
    first, and the error line says how to resume it."""
    try:
        yield
    except EnvFault as exc:
        if runner.ranks.active or runner.update_idx == runner._first_update:
            raise
        path = runner.save(at=at)
        raise EnvFault(f"{exc}; the run until step {step:,} is saved: ppo-train resume={path} continues") from None
