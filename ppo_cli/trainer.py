"""The training loop: rollout -> advantages -> update -> log -> checkpoint, until total_timesteps.

It also owns the schedules (derived from the global step, so a resumed run is at the same point of them),
when to log and checkpoint, and what SIGINT/SIGTERM do: stop at the current step, save, and say how to
resume.
"""

from __future__ import annotations

import math
import signal
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from ppo_cli import checkpoint
from ppo_cli.config import choice
from ppo_cli.envs import describe_space, make_vec_env, restore, snapshot
from ppo_cli.errors import UserError
from ppo_cli.evaluation import EvalResult, evaluate
from ppo_cli.fastpath import NumpyActor, NumpyLoss
from ppo_cli.logger import Logger
from ppo_cli.normalize import RewardScaler
from ppo_cli.policy import ActorCritic, build_policy, observation_dim
from ppo_cli.ppo import (
    STAT_NAMES,
    UpdateSettings,
    compile_loss,
    explained_variance,
    make_optimizer,
    minibatch_loss,
    update,
)
from ppo_cli.rollout import RolloutBuffer

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
EVAL_SEED_OFFSET = 10_000  # evaluation envs get their own seeds, far from the training envs' seed + i


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
    recent_return: float | None  # mean return of the last 100 training episodes
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


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda': torch sees no CUDA GPU here (use device=cpu or device=auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def schedule_value(start: float, end: float, kind: str, progress: float) -> float:
    """constant: start; linear: from start at progress 0 to end at progress 1."""
    return start if kind == "constant" else start + (end - start) * min(max(progress, 0.0), 1.0)


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume: dict[str, Any] | None = None,
                 rich_progress: bool | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        a = cfg.algo
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
            # numpy's BLAS pool too: N sweep jobs on N cores must not each start a thread per core.
            threadpool_limits(cfg.torch_threads)
        self.device = resolve_device(choice(cfg.device))
        torch.manual_seed(cfg.seed)
        # One generator for everything random in training (action sampling, minibatch shuffles): its state
        # goes into the checkpoint, and nothing else (evaluation, logging) draws from it.
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.envs = make_vec_env(cfg.env, seed=cfg.seed)
        self.obs_space = describe_space(self.envs.single_observation_space)
        self.action_space = describe_space(self.envs.single_action_space, bounds=True)
        self.policy: ActorCritic = build_policy(self.obs_space, self.action_space, cfg).to(self.device)
        self.optimizer = make_optimizer(self.policy, choice(a.optimizer), a.lr_actor, a.lr_critic, a.eps,
                                        a.weight_decay)
        self.obs_dtype = torch.long if self.obs_space["type"] == "Discrete" else torch.float32
        # The buffer stores features (what the network saw), not raw observations: see policy.features.
        self.buffer = RolloutBuffer(a.n_steps, cfg.env.num_envs, (observation_dim(self.obs_space),),
                                    torch.float32, self.policy.action_shape, self.policy.action_dtype, self.device)
        # The rollout acts in numpy where it can (CPU, plain MLP; see fastpath.NumpyActor), drawing its action
        # samples from np_rng; otherwise it acts through torch with `generator`. Both states are checkpointed.
        self.numpy_actor = NumpyActor.build(self.policy) if cfg.fast_rollout else None
        self.loss_fn = minibatch_loss
        self.notes: list[str] = []
        if cfg.torch_compile:
            if cfg.fast_update and NumpyLoss.applies(self.policy):
                self.notes.append("note: torch_compile=true has no effect: the numpy update (fast_update=true) "
                                  "covers this policy and is faster than the compiled autograd loss (README: Speed)")
            else:
                self.loss_fn = compile_loss()
        self.np_rng = np.random.default_rng(cfg.seed)
        self.reward_scaler = (RewardScaler(cfg.env.num_envs, a.gamma, cfg.env.clip_reward)
                              if cfg.env.normalize_reward else None)
        self.global_step, self.update_idx, self.wall_time = 0, 0, 0.0
        self.obs = torch.as_tensor(self.envs.reset(seed=cfg.seed)[0], device=self.device).to(self.obs_dtype)
        self.recent_returns: deque[float] = deque(maxlen=cfg.eval.train_window)
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self._stop_signal: int | None = None
        self.eval_envs: Any = None
        self.best_eval: dict[str, Any] | None = None
        self.eval_seconds = 0.0
        # Where training time goes (seconds since this process started training); `storage` is the rest of
        # the rollout loop: tensor conversions, buffer writes, episode bookkeeping, truncation bootstraps.
        self.stage_seconds = dict.fromkeys(("env", "policy", "storage", "advantages", "update", "log_checkpoint"), 0.0)
        if resume is not None:
            self._restore(resume)
        self.logger = Logger(self.run_dir, a.total_timesteps, self.global_step, self.config_yaml,
                             cfg.log_interval, purge_step=self.global_step if resume else None,
                             rich_progress=rich_progress)

    # --- checkpoint state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        env_state, _ = snapshot(self.envs)
        return {
            "config_yaml": self.config_yaml,
            "observation_space": self.obs_space,
            "action_space": self.action_space,
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_step": self.global_step,
            "update": self.update_idx,
            "rng": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "env_state": env_state,
            "last_obs": self.obs.cpu(),
            "recent_returns": list(self.recent_returns),
            "wall_time": self.wall_time,
            "best_eval": self.best_eval,
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
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
        self.global_step, self.update_idx = int(data["global_step"]), int(data.get("update", 0))
        self.wall_time = float(data.get("wall_time", 0.0))
        self.generator.set_state(data["rng"])
        if data.get("np_rng") is not None:
            self.np_rng.bit_generator.state = data["np_rng"]
        self.recent_returns.extend(data.get("recent_returns", []))
        self.best_eval = data.get("best_eval")
        if self.reward_scaler is not None and data.get("reward_scaler") is not None:
            self.reward_scaler.load_state_dict(data["reward_scaler"])
        env_state = data.get("env_state")
        last_obs = data.get("last_obs")
        if env_state is not None and last_obs is not None and len(last_obs) == self.cfg.env.num_envs:
            restore(self.envs, env_state)
            self.obs = last_obs.to(self.device, self.obs_dtype)
        else:
            _, why = snapshot(self.envs)
            self.notes.append(f"note: episodes in progress at the checkpoint restart from a reset "
                              f"({why or 'the checkpoint holds no env state'})")
            reset_obs = self.envs.reset(seed=self.cfg.seed + self.global_step)[0]
            self.obs = torch.as_tensor(reset_obs, device=self.device).to(self.obs_dtype)

    def save(self, name: str = CHECKPOINT_NAME) -> Path:
        return checkpoint.save(self.state(), self.run_dir / "checkpoints" / name)

    # --- the loop ---------------------------------------------------------------------------------------
    def _set_schedules(self) -> float:
        a = self.cfg.algo
        progress = self.global_step / a.total_timesteps
        lr_kind = choice(a.lr_schedule)
        for group in self.optimizer.param_groups:
            base = a.lr_actor if group["name"] == "actor" else a.lr_critic
            group["lr"] = schedule_value(base, 0.0, lr_kind, progress)
        return schedule_value(a.ent_coef, a.ent_coef_final, choice(a.ent_schedule), progress)

    def _collect(self) -> bool:
        """Fill the buffer with n_steps steps per env; False if a stop signal arrived first."""
        if self.numpy_actor is not None:
            return self._collect_numpy()
        policy, envs, buf, gen, dev = self.policy, self.envs, self.buffer, self.generator, self.device
        obs = self.obs
        clock, times = time.perf_counter, self.stage_seconds
        t_policy = t_env = 0.0
        for _ in range(buf.n_steps):
            if self._stop_signal is not None:
                return False
            t0 = clock()
            policy.update_obs_stats(obs)
            x = policy.features(obs)
            action, logp, value = policy.act_features(x, gen)
            env_action = policy.env_action(action)
            t1 = clock()
            next_obs, reward, terminated, truncated, ended, info = self._step_envs(env_action)
            t2 = clock()
            t_policy += t1 - t0
            t_env += t2 - t1
            buf.add(x, action, logp, value, torch.as_tensor(reward, device=dev),
                    torch.as_tensor(terminated, device=dev), torch.as_tensor(ended, device=dev))
            cut = np.flatnonzero(truncated & ~terminated)
            if cut.size:
                final_obs = torch.as_tensor(np.stack(info["final_obs"][cut]), device=dev).to(self.obs_dtype)
                buf.set_final_values(torch.as_tensor(cut, device=dev), policy.value(final_obs))
            if "_episode" in info:
                self._record_episodes(info)
            obs = torch.as_tensor(next_obs, device=dev).to(self.obs_dtype)
            self.obs = obs
            self.global_step += envs.num_envs
        times["policy"] += t_policy
        times["env"] += t_env
        return True

    def _record_episodes(self, info: dict[str, Any]) -> None:
        finished = info["_episode"]
        self._episode_returns.extend(info["episode"]["r"][finished].tolist())
        self._episode_lengths.extend(info["episode"]["l"][finished].tolist())

    def _step_envs(self, env_action: np.ndarray) -> tuple[Any, ...]:
        """envs.step, plus the reward scaling (training rewards only) and the episode-end mask."""
        next_obs, reward, terminated, truncated, info = self.envs.step(env_action)
        ended = terminated | truncated
        if self.reward_scaler is not None:
            reward = self.reward_scaler(reward, ended)
        return next_obs, reward, terminated, truncated, ended, info

    def _collect_numpy(self) -> bool:
        """_collect with the policy's forward pass and the buffer writes in numpy (same data, less overhead)."""
        actor, envs, buf, rng = self.numpy_actor, self.envs, self.buffer, self.np_rng
        assert actor is not None
        b_obs, b_act, b_logp, b_val = (t.numpy() for t in (buf.obs, buf.actions, buf.logp, buf.values))
        b_rew, b_term, b_end, b_final = (t.numpy() for t in (buf.rewards, buf.terminated, buf.episode_end,
                                                              buf.final_values))
        clock, times = time.perf_counter, self.stage_seconds
        t_policy = t_env = 0.0
        n = envs.num_envs
        raw = self.obs.numpy()
        obs = raw.reshape(n, -1).astype(np.float32, copy=False)
        for _ in range(buf.n_steps):
            if self._stop_signal is not None:
                self.obs = torch.from_numpy(np.array(raw, dtype=np.float32)).to(self.obs_dtype)
                return False
            t0 = clock()
            action, logp, value = actor.act(obs, rng)
            env_action = self.policy.env_action(action)
            t1 = clock()
            next_obs, reward, terminated, truncated, ended, info = self._step_envs(env_action)
            t2 = clock()
            t_policy += t1 - t0
            t_env += t2 - t1
            t = buf.step
            b_obs[t], b_act[t], b_logp[t], b_val[t] = obs, action, logp, value
            b_rew[t], b_term[t], b_end[t] = reward, terminated, ended
            b_final[t] = 0.0
            buf.step += 1
            cut = np.flatnonzero(truncated & ~terminated)
            if cut.size:
                final_obs = np.stack(info["final_obs"][cut]).reshape(cut.size, -1).astype(np.float32)
                b_final[t, cut] = actor.value(final_obs)
            if "_episode" in info:
                self._record_episodes(info)
            raw = next_obs
            obs = next_obs.reshape(n, -1).astype(np.float32, copy=False)
            self.global_step += n
        self.obs = torch.from_numpy(np.array(raw, dtype=np.float32)).to(self.obs_dtype)
        times["policy"] += t_policy
        times["env"] += t_env
        return True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def run(self) -> TrainResult:
        a, ev = self.cfg.algo, self.cfg.eval
        settings = UpdateSettings(a.clip_range, a.clip_range_vf, a.ent_coef, a.vf_coef, a.max_grad_norm,
                                  a.K_epochs, a.batch_size, a.normalize_advantage, a.target_kl)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        for note in self.notes:
            self.logger.message(note)
        last_eval: tuple[int, EvalResult] | None = None
        stopped_at: tuple[int, float] | None = None
        try:
            while self.global_step < a.total_timesteps:
                t0 = time.perf_counter()
                step0 = self.global_step
                settings.ent_coef = self._set_schedules()
                self._episode_returns: list[float] = []
                self._episode_lengths: list[int] = []
                inner = self.stage_seconds["env"] + self.stage_seconds["policy"]
                if not self._collect():
                    self.wall_time += time.perf_counter() - t0
                    path = self.save()
                    raise Interrupted(self._stop_signal, self.global_step, path)  # type: ignore[arg-type]
                t_collected = time.perf_counter()
                self.stage_seconds["storage"] += (t_collected - t0) - (
                    self.stage_seconds["env"] + self.stage_seconds["policy"] - inner)
                with torch.no_grad():
                    batch = self.buffer.advantages(self.policy.value(self.obs), a.gamma, a.gae_lambda)
                t_adv = time.perf_counter()
                self.stage_seconds["advantages"] += t_adv - t_collected
                stats = update(self.policy, self.optimizer, batch, settings, self.generator, fast=self.cfg.fast_update,
                               loss_fn=self.loss_fn)
                t_update = time.perf_counter()
                self.stage_seconds["update"] += t_update - t_adv
                bad = [k for k in STAT_NAMES if not math.isfinite(stats[k])]
                if bad:
                    raise Diverged(f"training diverged in the update at step {self.global_step:,}: "
                                   f"{', '.join(bad)} became non-finite; lower algo.lr_actor / algo.lr_critic, "
                                   f"algo.clip_range or algo.gae_lambda (checkpoints written before it are kept)")
                self.update_idx += 1
                self.recent_returns.extend(self._episode_returns)
                t_log = time.perf_counter()
                sps = (self.global_step - step0) / (t_log - t0)
                self._log(stats, batch.values, batch.returns, settings.ent_coef, sps)
                t_logged = time.perf_counter()
                self.stage_seconds["log_checkpoint"] += t_logged - t_log
                self.wall_time += t_logged - t0  # evaluation time is counted apart, in eval_seconds
                if ev.every_steps and self.global_step // ev.every_steps > step0 // ev.every_steps:
                    last_eval = (self.global_step, self._periodic_eval())
                    target = ev.stop_at_return
                    if target is not None and last_eval[1].mean_return >= target:
                        stopped_at = (self.global_step, self.wall_time)
                        self.logger.message(f"stopping: evaluated mean return {last_eval[1].mean_return:.2f} "
                                            f">= {target} at step {self.global_step:,} after "
                                            f"{self.wall_time:.1f} s of training")
                        break
                # After the evaluation, so the checkpoint's best_eval is never older than best.pt.
                if self.cfg.checkpoint_interval and self.update_idx % self.cfg.checkpoint_interval == 0:
                    t_save = time.perf_counter()
                    self.save()
                    saved = time.perf_counter() - t_save
                    self.stage_seconds["log_checkpoint"] += saved
                    self.wall_time += saved
            path = self.save()
            final_eval = None
            if ev.final:
                same_step = last_eval is not None and last_eval[0] == self.global_step
                final_eval = last_eval[1] if same_step else self._evaluate()  # type: ignore[index]
            recent = float(np.mean(self.recent_returns)) if self.recent_returns else None
            objective = {"final": final_eval.mean_return if final_eval else None,
                         "best": self.best_eval["mean_return"] if self.best_eval else None,
                         "train": recent}[choice(ev.objective)]
            objective = float("nan") if objective is None else float(objective)
            sps = self.global_step / max(self.wall_time, 1e-9)
            metrics = {"hparam/objective": objective, "hparam/sps": sps}
            if final_eval is not None:
                metrics["hparam/final_return"] = final_eval.mean_return
            self.logger.hparams(hparams_of(self.cfg), metrics, self.global_step)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.close()
        return TrainResult(self.run_dir, path, self.global_step, self.wall_time, sps, final_eval, self.best_eval,
                           self.eval_seconds, stopped_at, recent, objective)

    def _evaluate(self) -> EvalResult:
        """Score the current policy on the evaluation envs: the same function ppo-eval uses."""
        ev = self.cfg.eval
        t0 = time.perf_counter()
        seed = self.cfg.seed + EVAL_SEED_OFFSET
        if self.eval_envs is None:
            self.eval_envs = make_vec_env(self.cfg.env, seed=seed, num_envs=min(ev.episodes, self.cfg.env.num_envs))
        result = evaluate(self.policy, self.eval_envs, ev.episodes, seed=seed, deterministic=ev.deterministic,
                          device=self.device)
        self.eval_seconds += time.perf_counter() - t0
        return result

    def _periodic_eval(self) -> EvalResult:
        result = self._evaluate()
        step = self.global_step
        self.logger.scalars(step, {"eval/mean_return": result.mean_return, "eval/std_return": result.std_return,
                                   "eval/mean_length": result.mean_length, "charts/eval_seconds": self.eval_seconds})
        improved = self.best_eval is None or result.mean_return > self.best_eval["mean_return"]
        if improved:
            self.best_eval = {**result.summary(), "global_step": step}
            checkpoint.save({**self.state(), "eval": self.best_eval}, self.run_dir / "checkpoints" / BEST_NAME)
        best = self.best_eval["mean_return"]  # type: ignore[index]
        saved = ", saved best.pt" if improved else ""
        self.logger.message(f"eval @ {step:,}: mean return {result.mean_return:.2f} +/- {result.std_return:.2f} "
                            f"over {len(result.returns)} episodes (best {best:.2f}{saved})")
        return result

    def _log(self, stats: dict[str, float], values: torch.Tensor, returns: torch.Tensor, ent_coef: float,
             sps: float) -> None:
        step = self.global_step
        groups = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        scalars = {f"losses/{k}": stats[k] for k in
                   ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm")}
        scalars.update({
            "losses/explained_variance": explained_variance(values, returns),
            "losses/epochs": stats["epochs"],
            "charts/lr_actor": groups["actor"], "charts/lr_critic": groups["critic"],
            "charts/ent_coef": ent_coef, "charts/SPS": sps,
        })
        if self.policy.kind == "Box":
            scalars["charts/action_std"] = float(self.policy.log_std.detach().exp().mean())
        if self._episode_returns:
            scalars["charts/episodic_return"] = float(np.mean(self._episode_returns))
            scalars["charts/episodic_length"] = float(np.mean(self._episode_lengths))
        self.logger.scalars(step, scalars)
        mean_ret = float(np.mean(self.recent_returns)) if self.recent_returns else None
        self.logger.update_done(self.update_idx, step, sps, mean_ret)

    def close(self) -> None:
        self.envs.close()
        if self.eval_envs is not None:
            self.eval_envs.close()
