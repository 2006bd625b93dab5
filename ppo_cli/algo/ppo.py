"""PPO as an object the runner drives: `collect` a rollout, `learn` from it (advantages, then the update), and
`state_dict` / `load_state_dict`.

It owns the policy, the optimizer, the rollout storage and the actor's state (the last observation and action
mask, a recurrent state, the reward scaler, both random streams), so the rollout's state has one owner. It acts in
the envs it is handed and knows nothing of signals, the ranks' agreement to stop, run folders, evaluation or
logging: that is the runner's (run/runner.py). Under torchrun it averages gradients and merges observation
statistics with the other ranks (distributed.py), which is part of computing the update.

The maths lives below it: rollout.py (the one rollout loop), storage.py (buffer and GAE), update.py (loss,
gradients, optimizer step), fast/ (the numpy twins).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from omegaconf import DictConfig

from ppo_cli import distributed
from ppo_cli.algo.rollout import Collected, choose_actor, collect
from ppo_cli.algo.storage import Batch, RolloutBuffer, check_rollout_fits
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.algo.update import STAT_NAMES, Updater, UpdateSettings, explained_variance, make_optimizer
from ppo_cli.config import choice, env_label
from ppo_cli.distributed import Ranks
from ppo_cli.envs.masks import ActionMasks
from ppo_cli.envs.spaces import describe_space
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import ActorCritic, build_policy
from ppo_cli.policy.normalize import RewardScaler
from ppo_cli.policy.observations import as_arrays, as_tensors


def schedule_value(start: float, end: float, kind: str, progress: float) -> float:
    """constant: start; linear: from start at progress 0 to end at progress 1."""
    return start if kind == "constant" else start + (end - start) * min(max(progress, 0.0), 1.0)


def policy_player(policy: ActorCritic) -> Callable[[Any, np.ndarray, np.random.Generator], int]:
    """A frozen copy of `policy` as a two-player game's opponent (envs/selfplay.py): it samples its move among
    the legal ones with the game's random stream."""
    frozen = copy.deepcopy(policy).to("cpu").eval()

    def play(obs: Any, mask: np.ndarray, rng: np.random.Generator) -> int:
        with torch.no_grad():
            x = frozen.prepare(as_tensors({k: np.asarray(v)[None] for k, v in obs.items()}))
            action, _, _ = frozen.act(x, rng, mask=torch.as_tensor(mask[None], dtype=torch.bool))
        return int(frozen.env_action(action)[0])

    return play


class PPO:
    """Build it on the envs and their first observations; `load_state_dict` to resume; then `prepare()` once."""

    def __init__(self, cfg: DictConfig, envs: gym.vector.VectorEnv, obs: Any, info: dict[str, Any],
                 device: torch.device, ranks: Ranks, clock: Stopwatch, say: Callable[[str], None]) -> None:
        a = cfg.algo
        self.cfg, self.device, self.ranks, self.clock, self.say = cfg, device, ranks, clock, say
        rank = ranks.rank
        # Two random streams, both checkpointed and drawn from by training alone (never by evaluation or
        # logging): numpy's for the rollout's action samples (the same draws whichever actor runs), torch's for
        # the minibatch shuffles. Each rank has streams of its own.
        self.np_rng = np.random.default_rng(cfg.seed if rank == 0 else [cfg.seed, rank])
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)
        if ranks.active and a.multi_agent is not None:
            # Each rank would drop its own idle rows, and the ranks' minibatch steps would stop matching.
            raise UserError("algo.multi_agent runs in one process: torchrun is not built for PettingZoo envs")
        self.obs_space = describe_space(envs.single_observation_space)
        self.action_space = describe_space(envs.single_action_space, bounds=True)
        self.policy: ActorCritic = build_policy(self.obs_space, self.action_space, cfg, device).to(device)
        self.optimizer = make_optimizer(self.policy, choice(a.optimizer), a.lr_actor, a.lr_critic, a.eps,
                                        a.weight_decay, compiles=cfg.torch_compile)
        self.masks = ActionMasks.detect(envs, self.obs_space, self.action_space, info, env_label(cfg.env))
        self.start(envs, obs, info, 0)
        # The buffer stores network inputs (what the network saw), not raw observations: see policy.prepare.
        layout = self.policy.layout
        # env.num_envs, or its copies x agents of a PettingZoo env (envs/agents.py); not envs.num_envs, which for a
        # batch's member (algo/batched.py) counts every member's envs
        rows = cfg.env.num_envs * getattr(envs.unwrapped, "agents_per_copy", 1)
        if a.batch_size > a.n_steps * rows:  # config.validate checks one agent's envs; this, a row per agent
            raise UserError(f"algo.batch_size={a.batch_size}: larger than the rollout (algo.n_steps x env.num_envs x "
                            f"agents = {a.n_steps} x {cfg.env.num_envs} x {rows // cfg.env.num_envs} = "
                            f"{a.n_steps * rows})")
        check_rollout_fits(a.n_steps, rows, device, layout.stored_shape, layout.stored_dtype,
                           self.policy.action_shape, self.policy.action_dtype,
                           None if self.masks is None else self.masks.n_outputs, self.policy.state_size,
                           a.seq_len)
        self.buffer = RolloutBuffer(a.n_steps, rows, layout.stored_shape, layout.stored_dtype,
                                    self.policy.action_shape, self.policy.action_dtype, device,
                                    None if self.masks is None else self.masks.n_outputs, self.policy.state_size,
                                    obs_channels_last=layout.stored_channels_last, seq_len=a.seq_len,
                                    idle_rows=hasattr(envs.unwrapped, "alive"))
        self.reward_scaler = (RewardScaler(rows, a.gamma, cfg.env.clip_reward)
                              if cfg.env.normalize_reward else None)
        self.settings = UpdateSettings(a.clip_range, a.clip_range_vf, a.ent_coef, a.vf_coef, a.max_grad_norm,
                                       a.K_epochs, a.batch_size, a.normalize_advantage, a.target_kl)
        # algo=selfplay: the envs' shared opponents (envs/selfplay.py), joined by a snapshot of the policy each update
        self.opponents = getattr(envs.unwrapped, "opponents", None)
        if self.opponents is not None:
            self.opponents.size = a.selfplay_pool
        self.agent_means: dict[str, float] = {}  # a PettingZoo env's per-agent returns in the last rollout
        self._restored_recurrent: dict[str, torch.Tensor] | None = None
        self.actor: Any = None
        self.updater: Updater | None = None

    def start(self, envs: gym.vector.VectorEnv, obs: Any, info: dict[str, Any], step: int) -> None:
        """Act next from `obs`, the observations a reset of `envs` gave (with its `info`, for the action masks)."""
        self.obs = obs
        self.mask = None if self.masks is None else self.masks(obs, info, envs, step)

    def prepare(self) -> list[str]:
        """Build the actor and the updater, after any load_state_dict (the fast paths take views of the
        parameters and of the optimizer's state); the notes to print where a fast path was asked for and not taken."""
        cfg = self.cfg
        self.actor, note = choose_actor(self.policy, self.np_rng, self.device, cfg.fast_rollout, self.buffer.num_envs,
                                        cfg.torch_compile, self.say)
        if self._restored_recurrent is not None:
            self.actor.state = self._restored_recurrent["state"].to(self.device)
            self.actor.starts = self._restored_recurrent["starts"].numpy().copy()
        self.updater, update_notes = Updater.build(self.policy, self.optimizer, self.generator, cfg.fast_update,
                                                   cfg.torch_compile, self.ranks, self.say)
        return [n for n in (note, *update_notes) if n]

    # --- one iteration ----------------------------------------------------------------------------------
    def collect(self, envs: gym.vector.VectorEnv, stop: Callable[[], bool], step: int) -> Collected:
        """n_steps steps of every env into the rollout storage (`stop` drops the rollout after the env step in
        progress: the caller then discards it). Under torchrun the ranks' observation statistics are merged after,
        so that all normalize alike."""
        norm = self.policy.obs_norm
        before = (None if norm is None or not self.ranks.active
                  else (norm.mean.clone(), norm.var.clone(), norm.count.clone()))
        frozen = getattr(self.actor, "frozen", None)  # the numpy actor's (fast/core.py): weights fixed for a rollout
        with self.clock["storage"], frozen() if frozen is not None else nullcontext():
            rollout = collect(envs, self.actor, self.buffer, self.obs, self.reward_scaler, stop, self.clock,
                              self.masks, self.mask, step)
        if stop():
            return rollout
        self.obs, self.mask = rollout.obs, rollout.mask
        self.agent_means = rollout.agent_scalars(getattr(envs.unwrapped, "agent_names", None))
        if before is not None:
            distributed.merge_obs_stats(norm, before, self.ranks)
        return rollout

    def learn(self, progress: float) -> dict[str, float]:
        """GAE over the collected rollout, then the update, with the learning rates and entropy coefficient
        scheduled at `progress` (0 to 1 of the run's steps). Returns TensorBoard's scalars of the update."""
        a = self.cfg.algo
        self.schedule(progress)
        with self.clock["advantages"], torch.no_grad():
            x = self.policy.prepare(as_tensors(self.obs, self.device))
            batch = self.buffer.advantages(self.policy.value(x, self.actor.state), a.gamma, a.gae_lambda)
        with self.clock["update"]:
            stats = self.updater.update(batch, self.settings)  # type: ignore[union-attr]
        if self.opponents is not None:
            self.opponents.add(policy_player(self.policy))
        return {**self.scalars(stats, batch), **self.agent_means}

    def schedule(self, progress: float) -> None:
        """The learning rates and the entropy coefficient at `progress` (0 to 1 of the run's steps)."""
        a = self.cfg.algo
        for group in self.optimizer.param_groups:
            base = a.lr_actor if group["name"] == "actor" else a.lr_critic
            group["lr"] = schedule_value(base, 0.0, choice(a.lr_schedule), progress)
        self.settings.ent_coef = schedule_value(a.ent_coef, a.ent_coef_final, choice(a.ent_schedule), progress)

    def scalars(self, stats: dict[str, float], batch: Batch) -> dict[str, float]:
        """TensorBoard's scalars of an update: its statistics `stats` (Updater.update's) over `batch`."""
        lr = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        # How large the network's flat input is (the doctor's obs_scale); pixels, scaled inside the encoder, are not.
        image, scale = self.policy.layout.image_part, {}
        if batch.obs.is_floating_point():  # a plain image is stored as bytes: nothing flat to measure
            flat = batch.obs if image is None else batch.obs[:, image.size:]
            if flat.numel():
                scale = {"charts/input_scale": float(torch.linalg.vector_norm(flat, 1)) / flat.numel()}
        return {**{f"losses/{k}": stats[k] for k in STAT_NAMES}, **scale,
                "losses/explained_variance": explained_variance(batch.values, batch.returns),
                "losses/epochs": stats["epochs"],
                "charts/lr_actor": lr["actor"], "charts/lr_critic": lr["critic"],
                "charts/ent_coef": self.settings.ent_coef, **self.policy.dist.log_scalars()}

    # --- state ------------------------------------------------------------------------------------------
    def own_state(self) -> dict[str, Any]:
        """This process's part of the state (under torchrun every rank has its own; shared_state is the same on
        every rank). Copies only (the observations are never written in place): the runner keeps it while a
        rollout goes on."""
        return {
            "rng": self.generator.get_state(),
            "np_rng": self.np_rng.bit_generator.state,
            "last_obs": as_tensors(self.obs),
            "last_mask": None if self.mask is None else torch.from_numpy(self.mask.copy()),
            "recurrent_state": None if self.actor.state is None else {
                "state": self.actor.state.cpu().clone(), "starts": torch.from_numpy(self.actor.starts.copy())},
            "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
        }

    def buffers(self) -> dict[str, torch.Tensor]:
        """Copies of the policy's buffers (observation statistics): what a rollout changes of it."""
        names = {name for name, _ in self.policy.named_buffers()}
        return {k: v.clone() for k, v in self.policy.state_dict().items() if k in names}

    def shared_state(self, buffers: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The part of the state every rank holds alike: the policy (with `buffers`, from `buffers()`, in place of
        its current ones) and the optimizer."""
        policy = self.policy.state_dict()
        return {"policy": policy if buffers is None else {**policy, **buffers},
                "optimizer": self.optimizer.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        return {**self.shared_state(), **self.own_state()}

    def load_state_dict(self, data: dict[str, Any], continues: bool) -> list[str]:
        """Resume from a checkpoint's state (this rank's own part merged in; keys that are not the algorithm's are
        ignored). `continues`: the envs continue the episodes in progress, so the last observation, mask and
        recurrent state carry on too (else the caller starts from a reset). Returns the notes to print."""
        notes = []
        try:
            self.policy.load_state_dict(data["policy"])
            self.optimizer.load_state_dict(data["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"cannot resume: the checkpoint's network does not match the config "
                            f"({str(exc).splitlines()[0]})") from None
        for group in self.optimizer.param_groups:  # the config (maybe overridden on resume) decides these
            group["eps"], group["weight_decay"] = self.cfg.algo.eps, self.cfg.algo.weight_decay
        try:
            self.generator.set_state(data["rng"])
        except RuntimeError:  # a generator state of another device type (a cuda run resumed on the CPU, or back)
            self.generator.manual_seed(self.cfg.seed + self.ranks.rank)
            notes.append(f"note: the checkpoint's minibatch-shuffle generator was saved on another device type "
                         f"than {self.device.type}; it is reseeded from seed, so the minibatch shuffles (and the "
                         f"parameters) from here differ from an uninterrupted run's")
        if data.get("np_rng") is not None:
            self.np_rng.bit_generator.state = data["np_rng"]
        if self.reward_scaler is not None and data.get("reward_scaler") is not None:
            # Its statistics carry over; its per-env discounted returns belong to the episodes in progress.
            self.reward_scaler.load_state_dict(data["reward_scaler"], episodes=continues)
        if continues:
            self.obs = as_arrays(data["last_obs"])
            self.mask = None if data.get("last_mask") is None else data["last_mask"].numpy()
            self._restored_recurrent = data.get("recurrent_state")
        return notes
