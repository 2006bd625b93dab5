"""The runner: collect -> advantages -> update -> log -> evaluate -> checkpoint, until total_timesteps.

It builds the pieces once (envs, policy, optimizer, the rollout's actor, the updater, the evaluator) and owns
what ties them together: the schedules (derived from the global step, so a resumed run is at the same point of
them), the checkpoint state, and what SIGINT/SIGTERM do. A stop always checkpoints an update boundary, so that
stopping and resuming equals not stopping: a signal during a rollout drops the rollout after the env step in
progress and saves the state at its start (captured before every rollout); during an update, the update
finishes first; an evaluation in progress is abandoned. A second signal ends the process at once and keeps the
last checkpoint written (docs/evaluation-and-resume.md, "Stopping a run"). Distributed runs stop between
updates, all ranks together. How any one step is computed lives in rollout.py, ppo.py and evaluation.py.
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
from ppo_cli.algo.rollout import choose_actor, collect
from ppo_cli.algo.storage import RolloutBuffer
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.algo.update import (
    STAT_NAMES,
    Updater,
    UpdateSettings,
    divergence_message,
    explained_variance,
    make_optimizer,
)
from ppo_cli.config import choice, env_label
from ppo_cli.devices import choose_device, keep_freed_memory, torch_threads
from ppo_cli.envs.faults import count_steps, largest_reward
from ppo_cli.envs.make import kill_workers, make_vec_env, restore, snapshot
from ppo_cli.envs.masks import ActionMasks
from ppo_cli.envs.spaces import describe_space
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import ActorCritic, build_policy
from ppo_cli.policy.normalize import RewardScaler
from ppo_cli.policy.observations import as_arrays, as_tensors, batch_size
from ppo_cli.run import checkpoint
from ppo_cli.run.evaluation import EvalResult, PeriodicEvaluator
from ppo_cli.run.logger import Logger, QuietLogger

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
# Where training time goes; `storage` is the rollout loop's own time: conversions, buffer writes, episode
# bookkeeping, truncation bootstraps, reward scaling.
STAGES = ("env", "policy", "storage", "advantages", "update", "log_checkpoint")


class Diverged(UserError):
    """The update produced non-finite losses; parameters after it are garbage, so nothing more is saved."""


class Interrupted(Exception):
    """Training stopped by a signal; `path` holds the state at the update boundary `step`."""

    def __init__(self, signum: int, step: int, path: Path, in_final_eval: bool = False) -> None:
        name = signal.Signals(signum).name
        if in_final_eval:
            text = (f"interrupted by {name} during the final evaluation; the run is trained (step {step:,}) and its "
                    f"checkpoint is kept: {path} (ppo-eval {path} evaluates it)")
        else:
            text = (f"interrupted by {name}; checkpoint at step {step:,} (an update boundary) saved to {path}; "
                    f"resume with: ppo-train resume={path}")
        super().__init__(text)
        self.signum, self.step, self.path = signum, step, path


class _EvaluationStopped(BaseException):
    """Raised by the signal handler into an evaluation in progress. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way (an env's, or the evaluation's own fault handling) takes it for an
    env failure."""


@dataclass
class Boundary:
    """What a rollout changes of the state at the update boundary it starts from: this process's part
    (Trainer._rank_state: env snapshot, random streams, last observation, reward scaler, recurrent state) and
    the policy's buffers (observation statistics). Parameters and optimizer change only in the update."""

    own: dict[str, Any]
    buffers: dict[str, torch.Tensor]


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
    stopped_at: tuple[int, float] | None  # (step, training seconds) where eval.stop_at_return was met
    recent_return: float | None  # mean return of the last eval.train_window training episodes
    objective: float  # what eval.objective names: final eval, best eval or recent training return


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


def schedule_value(start: float, end: float, kind: str, progress: float) -> float:
    """constant: start; linear: from start at progress 0 to end at progress 1."""
    return start if kind == "constant" else start + (end - start) * min(max(progress, 0.0), 1.0)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM call `handler` inside the block; the previous handlers come back after it."""
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextmanager
def held_from_workers(remember: Any) -> Iterator[None]:
    """Processes started inside the block (env.vectorization=async workers) never receive SIGINT or SIGTERM.

    Ctrl-C in a terminal signals the whole foreground process group, and Slurm every process of the job; a worker
    that died of it would take the run down with it. The signals are blocked here, and a child inherits the
    blocked mask under every start method (fork, forkserver, spawn). Those that arrive meanwhile go to `remember`
    when the block ends (or at once, where a thread of this process that does not block them takes them). The
    trainer ends its workers itself: envs.close(), or SIGKILL (_stop_at_once).
    """
    with stop_signals(remember):
        if not hasattr(signal, "pthread_sigmask"):  # Windows
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _say(text: str) -> None:
    """One line on stderr from a signal handler: os.write, because the handler may run while the main thread is
    inside a print to the same stream, where a buffered write would raise "reentrant call"."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume: dict[str, Any] | None = None,
                 rich_progress: bool | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        threads = torch_threads(cfg)
        if threads:
            torch.set_num_threads(threads)
            # numpy's BLAS pool too: N sweep jobs on N cores must not each start a thread per core.
            threadpool_limits(threads)
        self.device = choose_device(cfg).device
        if self.device.type == "cpu":
            keep_freed_memory()
        # Under torchrun: this process's rank; rank 0 alone evaluates and writes files (distributed.py).
        self.ranks = distributed.setup(self.device)
        rank = self.ranks.rank
        torch.manual_seed(cfg.seed)  # the same initial parameters on every rank
        # Two random streams, both checkpointed and drawn from by training alone (never by evaluation or
        # logging): numpy's for the rollout's action samples (the same draws whichever actor runs), torch's for
        # the minibatch shuffles. Each rank has streams and envs (seeds seed + rank * num_envs + i) of its own.
        self.np_rng = np.random.default_rng(cfg.seed if rank == 0 else [cfg.seed, rank])
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + rank)
        self.env_seed = cfg.seed + rank * cfg.env.num_envs
        self._pid = os.getpid()
        self._stop_signal: int | None = None
        self._phase: str | None = None  # "rollout", "update" or "evaluation", for what a signal does and says
        self._saved: tuple[Path, int] | None = None  # the last checkpoint.pt written (or resumed from), its step
        # Sync envs run in this process: a Ctrl-C while they are built is a KeyboardInterrupt, as anywhere outside
        # run(). Async workers must not see it (held_from_workers); it then stops the run at its first boundary.
        async_workers = cfg.env.vectorization == "async"
        with held_from_workers(self._remember_signal) if async_workers else nullcontext():
            self.envs = make_vec_env(cfg.env, seed=self.env_seed, training=True)
        try:
            self._build(cfg, resume, rich_progress)
        except BaseException:  # what was opened so far is closed; the error goes on to the user
            self.envs.close()
            distributed.teardown()
            raise

    def _build(self, cfg: DictConfig, resume: dict[str, Any] | None, rich_progress: bool | None) -> None:
        a = cfg.algo
        self.obs_space = describe_space(self.envs.single_observation_space)
        self.action_space = describe_space(self.envs.single_action_space, bounds=True)
        self.policy: ActorCritic = build_policy(self.obs_space, self.action_space, cfg, self.device).to(self.device)
        self.optimizer = make_optimizer(self.policy, choice(a.optimizer), a.lr_actor, a.lr_critic, a.eps,
                                        a.weight_decay)
        self.obs, info = self.envs.reset(seed=self.env_seed)
        self.masks = ActionMasks.detect(self.envs, self.obs_space, self.action_space, info, env_label(cfg.env))
        self.mask = None if self.masks is None else self.masks(self.obs, info, self.envs, 0)
        # The buffer stores network inputs (what the network saw), not raw observations: see policy.prepare.
        self.buffer = RolloutBuffer(a.n_steps, cfg.env.num_envs, self.policy.layout.stored_shape,
                                    self.policy.layout.stored_dtype,
                                    self.policy.action_shape, self.policy.action_dtype, self.device,
                                    None if self.masks is None else self.masks.n_outputs, self.policy.state_size,
                                    obs_channels_last=self.policy.layout.stored_channels_last)
        self.reward_scaler = (RewardScaler(cfg.env.num_envs, a.gamma, cfg.env.clip_reward)
                              if cfg.env.normalize_reward else None)
        self.global_step, self.update_idx, self.trained_before = 0, 0, 0.0
        self.recent_returns: deque[float] = deque(maxlen=cfg.eval.train_window)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.clock = Stopwatch(STAGES)
        self.notes: list[str] = []
        self._restored_recurrent: dict[str, torch.Tensor] | None = None
        # best.pt is written by rank 0 alone, so it holds rank 0's part of the state only.
        self.evaluator = PeriodicEvaluator(cfg, self.policy, self.device, self.run_dir / "checkpoints" / BEST_NAME,
                                           self._best_state, self._message)
        if resume is not None:
            self._restore(resume)
            if cfg.get("resume"):
                self._saved = (Path(cfg.resume), self.global_step)
        count_steps(self.envs, self.global_step, self.ranks.world)  # env faults name the step as the run counts it
        self._first_update = self.update_idx
        # Built after the restore: the fast paths take views of the parameters and the optimizer's state.
        self.actor, note = choose_actor(self.policy, self.np_rng, self.device, cfg.fast_rollout, cfg.env.num_envs,
                                        cfg.torch_compile, self._message)
        if self._restored_recurrent is not None:
            self.actor.state = self._restored_recurrent["state"].to(self.device)
            self.actor.starts = self._restored_recurrent["starts"].numpy().copy()
        self.updater, update_notes = Updater.build(self.policy, self.optimizer, self.generator, cfg.fast_update,
                                                   cfg.torch_compile, self.ranks, self._message)
        self.notes += [n for n in (note, *update_notes) if n]
        if self.ranks.main:
            self.logger = Logger(self.run_dir, a.total_timesteps, self.global_step, self.config_yaml,
                                 cfg.log_interval, purge_step=self.global_step if resume else None,
                                 rich_progress=rich_progress)
        else:
            self.logger = QuietLogger()

    @property
    def wall_time(self) -> float:
        """Seconds of training (evaluation excluded), including before a resume."""
        return self.trained_before + self.clock.total()

    @property
    def stage_seconds(self) -> dict[str, float]:
        return self.clock.seconds

    def _message(self, text: str) -> None:
        self.logger.message(text)

    # --- checkpoint state -------------------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """The part of the training state that is this process's own (checkpoint.RANK_KEYS). Copies only (the
        observations are never written in place): a Boundary keeps it while a rollout goes on."""
        env_state, _ = snapshot(self.envs)
        return {
            "rng": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "env_state": env_state,
            "last_obs": as_tensors(self.obs),
            "last_mask": None if self.mask is None else torch.from_numpy(self.mask.copy()),
            "recurrent_state": None if self.actor.state is None else {
                "state": self.actor.state.cpu().clone(), "starts": torch.from_numpy(self.actor.starts.copy())},
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
        }

    def _boundary(self) -> Boundary:
        """The state a rollout is about to change, for a stop that drops the rollout (Boundary)."""
        names = {name for name, _ in self.policy.named_buffers()}
        buffers = {k: v.clone() for k, v in self.policy.state_dict().items() if k in names}
        return Boundary(self._rank_state(), buffers)

    def state(self, all_ranks: bool = True, at: Boundary | None = None) -> dict[str, Any]:
        """The training state (checkpoint.STATE_KEYS): rank 0's own part at the top level, the other ranks' in
        `ranks` (gathered: with `all_ranks`, every rank must call this at the same point). `at`: the state at the
        start of the rollout in progress instead of now (one process only)."""
        own = self._rank_state() if at is None else at.own
        policy = self.policy.state_dict() if at is None else {**self.policy.state_dict(), **at.buffers}
        others = None
        if self.ranks.active and all_ranks:
            checksum = float(sum(p.detach().double().abs().sum() for p in self.policy.parameters()))
            gathered = distributed.gather({**own, "param_checksum": checksum}, self.ranks)
            if len({g["param_checksum"] for g in gathered}) != 1:
                raise RuntimeError("the ranks' parameters diverged (checksums "
                                   f"{[g['param_checksum'] for g in gathered]}); this is a bug in ppo-cli")
            others = [{k: v for k, v in g.items() if k != "param_checksum"} for g in gathered[1:]]
        return {
            "config_yaml": self.config_yaml,
            "observation_space": self.obs_space,
            "action_space": self.action_space,
            "policy": policy,
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "update": self.update_idx,
            **own,
            "world_size": self.ranks.world,
            "ranks": others,
            "recent_returns": list(self.recent_returns),
            "wall_time": self.wall_time,
            "best_eval": self.evaluator.best,
        }

    def _restore(self, data: dict[str, Any]) -> None:
        if data["observation_space"] != self.obs_space or data["action_space"] != self.action_space:
            raise UserError(f"cannot resume: the checkpoint's spaces ({data['observation_space']}, "
                            f"{data['action_space']}) differ from env.id={self.cfg.env.id!r}'s")
        try:
            self.policy.load_state_dict(data["policy"])
            self.optimizer.load_state_dict(data["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"cannot resume: the checkpoint's network does not match the config "
                            f"({str(exc).splitlines()[0]})") from None
        for group in self.optimizer.param_groups:  # the config (maybe overridden on resume) decides these
            group["eps"], group["weight_decay"] = self.cfg.algo.eps, self.cfg.algo.weight_decay
        saved_world = int(data.get("world_size", 1))
        if saved_world != self.ranks.world and not (self.ranks.world == 1 and data.get("ranks") is None):
            raise UserError(f"cannot resume: the checkpoint is of a {saved_world}-process run and this run has "
                            f"{self.ranks.world}; resume with torchrun --nproc_per_node={saved_world} (ppo-eval "
                            f"evaluates it as it is, and a new run can start from scratch with any number)")
        if self.ranks.rank > 0:  # this rank's own part of the state
            data = {**data, **data["ranks"][self.ranks.rank - 1]}
        self.global_step, self.update_idx = int(data["global_step"]), int(data.get("update", 0))
        self.trained_before = float(data.get("wall_time", 0.0))
        try:
            self.generator.set_state(data["rng"])
        except RuntimeError:  # a generator state of another device type (a cuda run resumed on the CPU, or back)
            self.generator.manual_seed(self.cfg.seed + self.ranks.rank)
            self.notes.append(f"note: the checkpoint's minibatch-shuffle generator was saved on another device type "
                              f"than {self.device.type}; it is reseeded from seed, so the minibatch shuffles (and the "
                              f"parameters) from here differ from an uninterrupted run's")
        if data.get("np_rng") is not None:
            self.np_rng.bit_generator.state = data["np_rng"]
        self.recent_returns.extend(data.get("recent_returns", []))
        self.evaluator.best = data.get("best_eval")
        env_state = data.get("env_state")
        last_obs = data.get("last_obs")
        last_mask = data.get("last_mask")
        saved_envs = None if last_obs is None else batch_size(last_obs)
        continues = (env_state is not None and saved_envs == self.cfg.env.num_envs
                     and (self.masks is None) == (last_mask is None))
        if self.reward_scaler is not None and data.get("reward_scaler") is not None:
            # Its statistics carry over; its per-env discounted returns belong to the episodes in progress.
            self.reward_scaler.load_state_dict(data["reward_scaler"], episodes=continues)
        if continues:
            restore(self.envs, env_state)
            self.obs = as_arrays(last_obs)
            self.mask = None if last_mask is None else last_mask.numpy()
            self._restored_recurrent = data.get("recurrent_state")
        else:
            if saved_envs is not None and saved_envs != self.cfg.env.num_envs:
                why = f"env.num_envs is {self.cfg.env.num_envs}, the checkpoint's {saved_envs}"
            else:
                why = snapshot(self.envs)[1] or "the checkpoint holds no env state"
            scaler = ("; env.normalize_reward keeps its statistics and restarts its per-env discounted returns"
                      if self.reward_scaler is not None else "")
            self.notes.append(f"note: episodes in progress at the checkpoint restart from a reset ({why}){scaler}")
            self.obs, info = self.envs.reset(seed=self.env_seed + self.global_step)
            self.mask = None if self.masks is None else self.masks(self.obs, info, self.envs, self.global_step)

    def save(self, name: str = CHECKPOINT_NAME, at: Boundary | None = None) -> Path:
        """Write a checkpoint (rank 0; the other ranks give it their state): every rank calls this together.
        `at`: of the state at the start of the rollout in progress (Trainer.state)."""
        state = self.state(at=at)
        path = self.run_dir / "checkpoints" / name
        if not self.ranks.main:
            return path
        checkpoint.save(state, path)
        if name == CHECKPOINT_NAME:
            self._saved = (path, int(state["global_step"]))
        return path

    def _best_state(self) -> dict[str, Any]:
        """The state best.pt holds. The evaluator asks for it just before writing best.pt: from here on the
        evaluation is over, and a signal waits for the write instead of abandoning it (`_evaluation`)."""
        self._phase = None
        return self.state(all_ranks=False)

    # --- the loop ---------------------------------------------------------------------------------------
    def _set_schedules(self) -> float:
        a = self.cfg.algo
        progress = self.global_step / a.total_timesteps
        lr_kind = choice(a.lr_schedule)
        for group in self.optimizer.param_groups:
            base = a.lr_actor if group["name"] == "actor" else a.lr_critic
            group["lr"] = schedule_value(base, 0.0, lr_kind, progress)
        return schedule_value(a.ent_coef, a.ent_coef_final, choice(a.ent_schedule), progress)

    # --- signals ----------------------------------------------------------------------------------------
    def _remember_signal(self, signum: int, _frame: Any) -> None:
        if os.getpid() == self._pid and self._stop_signal is None:
            self._stop_signal = signum

    def _on_signal(self, signum: int, _frame: Any) -> None:
        """SIGINT / SIGTERM during run(): see the module doc."""
        if os.getpid() != self._pid:
            return  # an env worker forked (evaluation envs, built in run()) inherits this handler: it ignores
        if self._stop_signal is not None:
            # One process: a second signal ends it at once. Under torchrun a rank may get a signal twice (from
            # the terminal or Slurm, and forwarded by torchrun, which later kills what is left): no escalation.
            if not self.ranks.active:
                self._stop_at_once(signum)
            return
        self._stop_signal = signum
        if self._phase == "evaluation":
            raise _EvaluationStopped
        if self.ranks.main:
            _say(self._stop_notice(signum))

    def _stop_notice(self, signum: int) -> str:
        name = signal.Signals(signum).name
        if self.ranks.active:
            return f"ppo-train: {name}: every process stops after this update and saves a checkpoint"
        if self._phase == "rollout":
            what = (f"after the env step in progress; the rollout is dropped and the checkpoint holds step "
                    f"{self.global_step:,}, where it started")
        elif self._phase == "update":
            updates = self.update_idx - self._first_update
            seconds = self.clock.seconds["advantages"] + self.clock.seconds["update"]
            what = "after this update" + (f" (about {seconds / updates:.1f} s, as long as the updates so far)"
                                          if updates else "")
        else:
            what = f"at step {self.global_step:,}"
        return f"ppo-train: {name}: stopping {what} (a second Ctrl-C or SIGTERM stops at once, keeping the last " \
               f"checkpoint)"

    def _stop_at_once(self, signum: int) -> None:
        """End the process now (an env step that never returns, a long update): the last checkpoint written is
        complete (checkpoint.save is atomic) and stays; a write in progress leaves only a temporary file."""
        if self._saved is None:
            kept = "this run wrote no checkpoint yet"
        else:
            path, step = self._saved
            kept = f"the last checkpoint is kept: {path} (step {step:,}); resume with: ppo-train resume={path}"
        _say(f"ppo-train: stopped at once by a second {signal.Signals(signum).name}; {kept}")
        for envs in (self.envs, self.evaluator.envs):
            kill_workers(envs)
        os._exit(128 + signum)

    def _stop_requested(self) -> bool:
        # Distributed runs stop between updates, all ranks together (_stop_agreed); one process also drops a
        # rollout in progress (run()).
        return self._stop_signal is not None and not self.ranks.active

    def _stop_agreed(self) -> bool:
        """Whether to stop here; under torchrun every rank calls this at the same point and all agree."""
        return distributed.any_true(self._stop_signal is not None, self.ranks)

    @contextmanager
    def _evaluation(self) -> Iterator[None]:
        """An evaluation, which a stop signal abandons (it changes nothing a checkpoint holds but best.pt, whose
        write `_best_state` shields)."""
        try:
            self._phase = "evaluation"
            if self._stop_signal is not None:
                raise _EvaluationStopped
            yield
        finally:
            self._phase = None

    def run(self) -> TrainResult:
        a, ev, clock = self.cfg.algo, self.cfg.eval, self.clock
        settings = UpdateSettings(a.clip_range, a.clip_range_vf, a.ent_coef, a.vf_coef, a.max_grad_norm,
                                  a.K_epochs, a.batch_size, a.normalize_advantage, a.target_kl)
        for note in self.notes:
            self.logger.message(note)
        stopped_at: tuple[int, float] | None = None
        try:
            with stop_signals(self._on_signal):
                while self.global_step < a.total_timesteps:
                    if self._stop_agreed():
                        # Between updates (a signal to any rank stops all of them here): the checkpoint is
                        # exactly where an uninterrupted run would be.
                        raise Interrupted(self._stop_signal or signal.SIGTERM, self.global_step, self.save())
                    step0, time0 = self.global_step, clock.total()
                    settings.ent_coef = self._set_schedules()
                    norm = self.policy.obs_norm
                    before = (None if norm is None or not self.ranks.active
                              else (norm.mean.clone(), norm.var.clone(), norm.count.clone()))
                    start = None if self.ranks.active else self._boundary()
                    self._phase = "rollout"
                    with clock["storage"]:
                        rollout = collect(self.envs, self.actor, self.buffer, self.obs, self.reward_scaler,
                                          self._stop_requested, clock, self.masks, self.mask, self.global_step)
                    if self._stop_requested():  # one process, a signal: the rollout is dropped, its start saved
                        raise Interrupted(self._stop_signal, step0, self.save(at=start))  # type: ignore[arg-type]
                    self._phase = "update"
                    self.obs, self.mask = rollout.obs, rollout.mask
                    self.global_step += rollout.steps * self.ranks.world
                    if self.ranks.active:
                        if before is not None:
                            distributed.merge_obs_stats(norm, before, self.ranks)
                        episodes = distributed.gather((rollout.returns, rollout.lengths), self.ranks)
                        rollout.returns = [r for returns, _ in episodes for r in returns]
                        rollout.lengths = [n for _, lengths in episodes for n in lengths]
                    with clock["advantages"], torch.no_grad():
                        x = self.policy.prepare(as_tensors(self.obs, self.device))
                        batch = self.buffer.advantages(self.policy.value(x, self.actor.state), a.gamma,
                                                       a.gae_lambda)
                    with clock["update"]:
                        stats = self.updater.update(batch, settings)
                    self._check_finite(stats)
                    self.update_idx += 1
                    self.recent_returns.extend(rollout.returns)
                    self._phase = None
                    with clock["log_checkpoint"]:
                        sps = (self.global_step - step0) / max(clock.total() - time0, 1e-9)
                        self._log(stats, batch.values, batch.returns, settings.ent_coef, sps, rollout)
                    # A stop already asked for skips the evaluation (one process; the ranks all evaluate or not).
                    if self.evaluator.due(step0, self.global_step) and not self._stop_requested():
                        reached = False
                        if self.ranks.main:  # rank 0 evaluates; the others wait for its verdict
                            reached = self._periodic_evaluation()
                        if distributed.any_true(reached, self.ranks):
                            stopped_at = (self.global_step, self.wall_time)
                            break
                    # After the evaluation, so the checkpoint's best_eval is never older than best.pt.
                    if self.cfg.checkpoint_interval and self.update_idx % self.cfg.checkpoint_interval == 0:
                        with clock["log_checkpoint"]:
                            self.save()
                path = self.save()
                if self._stop_agreed():  # asked during the last update: the run is trained, the evaluation waits
                    raise Interrupted(self._stop_signal or signal.SIGTERM, self.global_step, path)
                final_eval = None
                if ev.final and self.ranks.main:
                    try:
                        with self._evaluation():
                            final_eval = self.evaluator.evaluate(self.global_step)
                    except _EvaluationStopped:
                        self.evaluator.abandon()
                        raise Interrupted(self._stop_signal, self.global_step, path,  # type: ignore[arg-type]
                                          in_final_eval=True) from None
            return self._finish(path, final_eval, stopped_at)
        finally:
            self.logger.close()

    def _periodic_evaluation(self) -> bool:
        """Evaluate (best.pt, TensorBoard, the message); whether eval.stop_at_return is reached. A stop signal
        abandons it: nothing is logged, and the best so far stays (best.pt was not being written, _best_state)."""
        best = self.evaluator.best
        try:
            with self._evaluation():
                result, scalars = self.evaluator.periodic(self.global_step)
        except _EvaluationStopped:
            self.evaluator.best = best
            self.evaluator.abandon()
            return False
        self.logger.scalars(self.global_step, scalars)
        reached = self.evaluator.reached_target(result)
        if reached:
            self.logger.message(f"stopping: evaluated mean return {result.mean_return:.2f} >= "
                                f"{self.cfg.eval.stop_at_return} at step {self.global_step:,} after "
                                f"{self.wall_time:.1f} s of training")
        return reached

    def _check_finite(self, stats: dict[str, float]) -> None:
        bad = [k for k in STAT_NAMES if not math.isfinite(stats[k])]
        if bad:
            raise Diverged(divergence_message(self.global_step, bad, largest_reward(self.envs),
                                              self.cfg.env.normalize_reward))

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
                           self.evaluator.seconds, stopped_at, recent, objective)

    def _log(self, stats: dict[str, float], values: torch.Tensor, returns: torch.Tensor, ent_coef: float,
             sps: float, rollout: Any) -> None:
        step = self.global_step
        groups = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        scalars = {f"losses/{k}": stats[k] for k in STAT_NAMES}
        scalars.update({
            "losses/explained_variance": explained_variance(values, returns),
            "losses/epochs": stats["epochs"],
            "charts/lr_actor": groups["actor"], "charts/lr_critic": groups["critic"],
            "charts/ent_coef": ent_coef, "charts/SPS": sps,
            **self.policy.dist.log_scalars(),
        })
        if rollout.returns:
            scalars["charts/episodic_return"] = float(np.mean(rollout.returns))
            scalars["charts/episodic_length"] = float(np.mean(rollout.lengths))
        self.logger.scalars(step, scalars)
        mean_ret = float(np.mean(self.recent_returns)) if self.recent_returns else None
        self.logger.update_done(self.update_idx, step, sps, mean_ret)

    def close(self) -> None:
        self.envs.close()
        self.evaluator.close()
        distributed.teardown()
