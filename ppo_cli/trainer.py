"""The runner: collect -> advantages -> update -> log -> evaluate -> checkpoint, until total_timesteps.

It builds the pieces once (envs, policy, optimizer, the rollout's actor, the updater, the evaluator) and owns
what ties them together: the schedules (derived from the global step, so a resumed run is at the same point of
them), the checkpoint state, and what SIGINT/SIGTERM do (stop at the current step, save, say how to resume).
How any one step is computed lives in rollout.py, ppo.py and evaluation.py.
"""

from __future__ import annotations

import math
import signal
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from ppo_cli import checkpoint, distributed
from ppo_cli.config import choice
from ppo_cli.devices import choose_device
from ppo_cli.envs import describe_space, env_label, make_vec_env, restore, snapshot
from ppo_cli.errors import UserError
from ppo_cli.evaluation import EvalResult, PeriodicEvaluator
from ppo_cli.logger import Logger, QuietLogger
from ppo_cli.masks import ActionMasks
from ppo_cli.normalize import RewardScaler
from ppo_cli.observations import as_arrays, as_tensors, batch_size
from ppo_cli.policy import ActorCritic, build_policy
from ppo_cli.ppo import STAT_NAMES, Updater, UpdateSettings, explained_variance, make_optimizer
from ppo_cli.rollout import RolloutBuffer, choose_actor, collect
from ppo_cli.timing import Stopwatch

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
# Where training time goes; `storage` is the rollout loop's own time: conversions, buffer writes, episode
# bookkeeping, truncation bootstraps, reward scaling.
STAGES = ("env", "policy", "storage", "advantages", "update", "log_checkpoint")


class Diverged(UserError):
    """The update produced non-finite losses; parameters after it are garbage, so nothing more is saved."""


class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step:,}; checkpoint saved")
        self.signum, self.step, self.path = signum, step, path


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


@contextmanager
def stop_signals(handler: Any) -> Iterator[None]:
    """SIGINT and SIGTERM call `handler` inside the block; the previous handlers come back after it."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume: dict[str, Any] | None = None,
                 rich_progress: bool | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
            # numpy's BLAS pool too: N sweep jobs on N cores must not each start a thread per core.
            threadpool_limits(cfg.torch_threads)
        self.device = choose_device(cfg).device
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
        self.policy: ActorCritic = build_policy(self.obs_space, self.action_space, cfg).to(self.device)
        self.optimizer = make_optimizer(self.policy, choice(a.optimizer), a.lr_actor, a.lr_critic, a.eps,
                                        a.weight_decay)
        self.obs, info = self.envs.reset(seed=self.env_seed)
        self.masks = ActionMasks.detect(self.envs, self.obs_space, self.action_space, info, env_label(cfg.env))
        self.mask = None if self.masks is None else self.masks(self.obs, info, self.envs, 0)
        # The buffer stores network inputs (what the network saw), not raw observations: see policy.prepare.
        self.buffer = RolloutBuffer(a.n_steps, cfg.env.num_envs, self.policy.layout.stored_shape,
                                    self.policy.layout.stored_dtype,
                                    self.policy.action_shape, self.policy.action_dtype, self.device,
                                    None if self.masks is None else self.masks.n_outputs, self.policy.state_size)
        self.reward_scaler = (RewardScaler(cfg.env.num_envs, a.gamma, cfg.env.clip_reward)
                              if cfg.env.normalize_reward else None)
        self.global_step, self.update_idx, self.trained_before = 0, 0, 0.0
        self.recent_returns: deque[float] = deque(maxlen=cfg.eval.train_window)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self._stop_signal: int | None = None
        self.clock = Stopwatch(STAGES)
        self.notes: list[str] = []
        self._restored_recurrent: dict[str, torch.Tensor] | None = None
        # best.pt is written by rank 0 alone, so it holds rank 0's part of the state only.
        self.evaluator = PeriodicEvaluator(cfg, self.policy, self.device, self.run_dir / "checkpoints" / BEST_NAME,
                                           lambda: self.state(all_ranks=False), self._message)
        if resume is not None:
            self._restore(resume)
        # Built after the restore: the fast paths take views of the parameters and the optimizer's state.
        self.actor, note = choose_actor(self.policy, self.np_rng, self.device, cfg.fast_rollout, cfg.env.num_envs)
        if self._restored_recurrent is not None:
            self.actor.state = self._restored_recurrent["state"].to(self.device)
            self.actor.starts = self._restored_recurrent["starts"].numpy().copy()
        self.updater, update_notes = Updater.build(self.policy, self.optimizer, self.generator, cfg.fast_update,
                                                   cfg.torch_compile, self.ranks)
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
        """The part of the training state that is this process's own (checkpoint.RANK_KEYS)."""
        env_state, _ = snapshot(self.envs)
        return {
            "rng": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "env_state": env_state,
            "last_obs": as_tensors(self.obs),
            "last_mask": None if self.mask is None else torch.from_numpy(self.mask.copy()),
            "recurrent_state": None if self.actor.state is None else {
                "state": self.actor.state.cpu(), "starts": torch.from_numpy(self.actor.starts.copy())},
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
        }

    def state(self, all_ranks: bool = True) -> dict[str, Any]:
        """The training state (checkpoint.STATE_KEYS): rank 0's own part at the top level, the other ranks' in
        `ranks` (gathered: with `all_ranks`, every rank must call this at the same point)."""
        own = self._rank_state()
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
            "policy": self.policy.state_dict(),
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
        self.generator.set_state(data["rng"])
        if data.get("np_rng") is not None:
            self.np_rng.bit_generator.state = data["np_rng"]
        self.recent_returns.extend(data.get("recent_returns", []))
        self.evaluator.best = data.get("best_eval")
        if self.reward_scaler is not None and data.get("reward_scaler") is not None:
            self.reward_scaler.load_state_dict(data["reward_scaler"])
        env_state = data.get("env_state")
        last_obs = data.get("last_obs")
        last_mask = data.get("last_mask")
        if (env_state is not None and last_obs is not None and batch_size(last_obs) == self.cfg.env.num_envs
                and (self.masks is None) == (last_mask is None)):
            restore(self.envs, env_state)
            self.obs = as_arrays(last_obs)
            self.mask = None if last_mask is None else last_mask.numpy()
            self._restored_recurrent = data.get("recurrent_state")
        else:
            _, why = snapshot(self.envs)
            self.notes.append(f"note: episodes in progress at the checkpoint restart from a reset "
                              f"({why or 'the checkpoint holds no env state'})")
            self.obs, info = self.envs.reset(seed=self.env_seed + self.global_step)
            self.mask = None if self.masks is None else self.masks(self.obs, info, self.envs, self.global_step)

    def save(self, name: str = CHECKPOINT_NAME) -> Path:
        """Write a checkpoint (rank 0; the other ranks give it their state): every rank calls this together."""
        state = self.state()
        path = self.run_dir / "checkpoints" / name
        return checkpoint.save(state, path) if self.ranks.main else path

    # --- the loop ---------------------------------------------------------------------------------------
    def _set_schedules(self) -> float:
        a = self.cfg.algo
        progress = self.global_step / a.total_timesteps
        lr_kind = choice(a.lr_schedule)
        for group in self.optimizer.param_groups:
            base = a.lr_actor if group["name"] == "actor" else a.lr_critic
            group["lr"] = schedule_value(base, 0.0, lr_kind, progress)
        return schedule_value(a.ent_coef, a.ent_coef_final, choice(a.ent_schedule), progress)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _stop_requested(self) -> bool:
        # Distributed runs stop between updates, all ranks together (run()); one process stops at once.
        return self._stop_signal is not None and not self.ranks.active

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
                    if self.ranks.active and distributed.any_true(self._stop_signal is not None, self.ranks):
                        # A signal to any rank stops all of them here, between updates: the checkpoint is then
                        # exactly where an uninterrupted run would be.
                        raise Interrupted(self._stop_signal or signal.SIGTERM, self.global_step, self.save())
                    step0, time0 = self.global_step, clock.total()
                    settings.ent_coef = self._set_schedules()
                    norm = self.policy.obs_norm
                    before = None if norm is None else (norm.mean.clone(), norm.var.clone(), norm.count.clone())
                    with clock["storage"]:
                        rollout = collect(self.envs, self.actor, self.buffer, self.obs, self.reward_scaler,
                                          self._stop_requested, clock, self.masks, self.mask, self.global_step)
                    self.obs, self.mask = rollout.obs, rollout.mask
                    self.global_step += rollout.steps * self.ranks.world
                    if not rollout.complete:
                        raise Interrupted(self._stop_signal, self.global_step, self.save())  # type: ignore[arg-type]
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
                    with clock["log_checkpoint"]:
                        sps = (self.global_step - step0) / max(clock.total() - time0, 1e-9)
                        self._log(stats, batch.values, batch.returns, settings.ent_coef, sps, rollout)
                    if self.evaluator.due(step0, self.global_step):
                        reached = False
                        if self.ranks.main:  # rank 0 evaluates; the others wait for its verdict
                            result, scalars = self.evaluator.periodic(self.global_step)
                            self.logger.scalars(self.global_step, scalars)
                            reached = self.evaluator.reached_target(result)
                            if reached:
                                self.logger.message(f"stopping: evaluated mean return {result.mean_return:.2f} "
                                                    f">= {ev.stop_at_return} at step {self.global_step:,} after "
                                                    f"{self.wall_time:.1f} s of training")
                        if distributed.any_true(reached, self.ranks):
                            stopped_at = (self.global_step, self.wall_time)
                            break
                    # After the evaluation, so the checkpoint's best_eval is never older than best.pt.
                    if self.cfg.checkpoint_interval and self.update_idx % self.cfg.checkpoint_interval == 0:
                        with clock["log_checkpoint"]:
                            self.save()
                path = self.save()
            final_eval = self.evaluator.evaluate(self.global_step) if ev.final and self.ranks.main else None
            return self._finish(path, final_eval, stopped_at)
        finally:
            self.logger.close()

    def _check_finite(self, stats: dict[str, float]) -> None:
        bad = [k for k in STAT_NAMES if not math.isfinite(stats[k])]
        if bad:
            raise Diverged(f"training diverged in the update at step {self.global_step:,}: "
                           f"{', '.join(bad)} became non-finite; lower algo.lr_actor / algo.lr_critic, "
                           f"algo.clip_range or algo.gae_lambda (checkpoints written before it are kept)")

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
