"""Several PPO runs trained as one: the members of a batch (`ppo-train -m ... hydra/launcher=ppo_batched`).

Each member is a whole `PPO` (ppo.py) built as its single run builds it: its own policy, optimizer, random streams,
reward scaler and observation statistics, so its checkpoint is a single run's. `BatchedPPO` drives them together:
one vector env holds every member's envs (member k's are envs k*E to k*E+E-1), one rollout loop (rollout.collect)
acts through `StackedActor`, one storage holds every env's steps, and each minibatch step is one numpy pass over
every member's stacked parameters (fast/stacked.py), each member with its own shuffles, settings, gradient clip,
early stop and optimizer state. Members never interact: member k computes what the single run of member k does
(tests/test_batched.py measures how closely).

Covered: what the numpy fast path covers (fast.core.covers: MLP policies on the CPU), without action masks.
`refusal` says why a batch is not, and the launcher then trains its members one after another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from ppo_cli.algo.fast.core import NumpyActor, contiguous, covers
from ppo_cli.algo.fast.observations import NumpyInput
from ppo_cli.algo.fast.stacked import StackedParameters
from ppo_cli.algo.ppo import PPO
from ppo_cli.algo.rollout import Collected, collect
from ppo_cli.algo.storage import Batch, RolloutBuffer
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.algo.update import STAT_NAMES, FusedAdamStep
from ppo_cli.policy.normalize import StackedObsStats
from ppo_cli.policy.observations import as_tensors, batch_size

# The settings members may differ in (everything else of their configs must be equal): the continuous knobs of
# the update, and the seed.
MEMBER_KEYS = ("seed", "algo.lr_actor", "algo.lr_critic", "algo.clip_range", "algo.clip_range_vf", "algo.ent_coef",
               "algo.ent_coef_final", "algo.vf_coef", "algo.gamma", "algo.gae_lambda", "algo.max_grad_norm",
               "algo.target_kl", "algo.total_timesteps")


def refusal(member: PPO) -> str | None:
    """Why members like `member` cannot be trained as a batch (None: they can)."""
    cfg = member.cfg
    if not (cfg.fast_update and cfg.fast_rollout) or cfg.torch_compile:
        return "fast_update=false, fast_rollout=false and torch_compile=true ask for torch's path, which batches skip"
    activation, why = covers(member.policy)
    if activation is None:
        return f"the batched update covers what the numpy fast path does ({why})"
    if cfg.algo.get("multi_agent") is not None:
        return "the batched runs cover one-agent envs (algo.multi_agent=null)"
    if member.masks is not None:
        return "the batched rollout does not cover action masks"
    if FusedAdamStep.build(member.optimizer) is None:
        return "the batched update steps fused Adam / AdamW optimizers only"
    return None


class StackedActor:
    """rollout.Actor for every member at once: the network input of each member's envs with its own observation
    statistics, then one stacked forward pass, each member's noise from its own stream."""

    def __init__(self, members: list[PPO], params: StackedParameters, activation: str,
                 stats: StackedObsStats | None = None) -> None:
        self.members, self.count, self.envs = members, len(members), members[0].cfg.env.num_envs
        self.trunk, self.actor, self.critic = params.networks(members[0].policy, activation)
        self.head = params.head(members[0].policy)
        self.inputs_of = [NumpyInput(m.policy.layout, m.policy.obs_norm) for m in members]
        self.normalized = members[0].policy.obs_norm is not None
        # The members' observation statistics, stacked (or given: an evaluation's copies of some members')
        self.stats = stats or (StackedObsStats([m.policy.obs_norm for m in members]) if self.normalized else None)
        self.active = np.ones(self.count, dtype=bool)  # the members still training
        self.noise: np.ndarray | None = None  # a rollout's noise, drawn ahead (predraw)
        self.t = 0

    def _member(self, obs: Any, k: int) -> Any:
        each = batch_size(obs) // self.count  # the training envs' env.num_envs, or an evaluation's envs
        rows = slice(k * each, (k + 1) * each)
        return {key: v[rows] for key, v in obs.items()} if isinstance(obs, dict) else obs[rows]

    def inputs(self, obs: Any, update_stats: bool = True, rows: np.ndarray | None = None) -> np.ndarray:
        if not self.normalized:  # the encoding holds no member's state: all rows at once
            return self.inputs_of[0].prepare(obs, False)
        if rows is not None:  # a few envs' final observations: each with its member's statistics
            owner = rows // self.envs
            out = [self.inputs_of[k].prepare(self._pick(obs, owner == k), False) for k in np.unique(owner)]
            return np.concatenate(out)
        return self.inputs_of[0].prepare(obs, update_stats, self._normalized)

    def _normalized(self, box: np.ndarray, update_stats: bool) -> np.ndarray:
        """NumpyInput.normalized for every member's rows at once, each by its own statistics."""
        stacked = box.reshape(self.count, -1, box.shape[-1])
        if update_stats:
            self.stats.update(torch.from_numpy(stacked))  # type: ignore[union-attr]
        clip = self.members[0].policy.obs_norm.clip  # type: ignore[union-attr]
        shift, scale = self.stats.shift.numpy()[:, None], self.stats.scale.numpy()[:, None]  # type: ignore[union-attr]
        return np.clip((stacked - shift) * scale, -clip, clip).reshape(box.shape)

    def mode(self, x: np.ndarray) -> np.ndarray:
        """The most likely actions (head.mode) of every member's rows: deterministic evaluation."""
        action = self.head.mode(self.actor.forward(self._features(x))[-1])
        return action.reshape(-1, *action.shape[2:])

    @staticmethod
    def _pick(obs: Any, where: np.ndarray) -> Any:
        return {key: v[where] for key, v in obs.items()} if isinstance(obs, dict) else obs[where]

    def _features(self, x: np.ndarray) -> np.ndarray:
        x = x.reshape(self.count, -1, x.shape[-1])
        return x if self.trunk is None else self.trunk.forward(x)[-1]

    def act(self, x: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h = self._features(x)
        out = self.actor.forward(h)[-1]
        if self.noise is not None and self.t < len(self.noise):
            noise, self.t = self.noise[self.t], self.t + 1
        else:
            noise = np.stack([m.policy.dist.noise(m.np_rng, self.envs) for m in self.members])
        action, logp = self.head.sample(out, noise)
        if not self.active.all():  # members done (finished, diverged) act 0 in their envs, never a NaN
            action[~self.active] = 0
        value = self.critic.forward(h)[-1][..., 0]
        return action.reshape(-1, *action.shape[2:]), logp.reshape(-1), value.reshape(-1)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """A rollout (NumpyActor.frozen): the stacked networks, and each member's own, which a truncated episode's
        bootstrap value reads, read contiguous copies of the weights."""
        with ExitStack() as stack:
            stack.enter_context(contiguous((self.trunk, self.actor, self.critic)))
            for m in self.members:
                stack.enter_context(m.actor.frozen())
            yield

    def predraw(self, steps: int | None) -> None:
        """Draw the noise of the next `steps` act calls now, one draw per member instead of one per member and step
        (None: stop). Each member's stream gives the same numbers in the same order either way; a rollout that is
        dropped restores each member's stream from where it began (run/batched.py)."""
        self.t = 0
        self.noise = None if steps is None else np.stack(
            [m.policy.dist.noise(m.np_rng, steps * self.envs).reshape(steps, self.envs, -1) for m in self.members],
            axis=1)

    def value(self, x: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        if rows is None:
            return self.critic.forward(self._features(x))[-1][..., 0].reshape(-1)
        # A few envs' rows: each through its own member's network (members in ascending order, as inputs gave them)
        owner = np.sort(rows // self.envs)
        out, start = [], 0
        for k in np.unique(owner):
            count = int((owner == k).sum())
            out.append(self.members[k].actor.value(x[start:start + count]))
            start += count
        return np.concatenate(out)

    def env_action(self, action: np.ndarray) -> np.ndarray:
        return self.members[0].policy.dist.env_action(action)

    state = starts = None

    def end_episodes(self, ended: np.ndarray) -> None:
        pass


class StackedRewardScaler:
    """normalize.RewardScaler of every member at once, over [members, envs] arrays (each member's statistics in
    float64, computed as its own scaler computes them), written back to the members' scalers for their
    checkpoints."""

    def __init__(self, members: list[PPO]) -> None:
        self.scalers = [m.reward_scaler for m in members]
        self.returns = np.stack([s.returns for s in self.scalers])  # type: ignore[union-attr]
        for k, s in enumerate(self.scalers):
            s.returns = self.returns[k]  # type: ignore[union-attr]
        self.gamma = np.array([[s.gamma] for s in self.scalers])  # type: ignore[union-attr]
        self.stats = np.array([[s.mean, s.var, s.count] for s in self.scalers])  # type: ignore[union-attr]
        first = self.scalers[0]
        self.clip, self.eps = first.clip, first.eps  # type: ignore[union-attr]

    def __call__(self, rewards: np.ndarray, episode_end: np.ndarray) -> np.ndarray:
        members = len(self.scalers)
        r, end = rewards.reshape(members, -1), episode_end.reshape(members, -1)
        self.returns[...] = self.returns * self.gamma + r
        b_mean, b_var, b_count = self.returns.mean(axis=1), self.returns.var(axis=1), r.shape[1]
        mean, var, count = self.stats.T
        delta, total = b_mean - mean, count + b_count
        mean = mean + delta * b_count / total
        var = (var * count + b_var * b_count + delta * delta * count * b_count / total) / total
        self.stats = np.stack([mean, var, total], axis=1)
        for s, (m, v, c) in zip(self.scalers, self.stats.tolist(), strict=True):
            s.mean, s.var, s.count = m, v, c  # type: ignore[union-attr]
        self.returns[end] = 0.0
        scaled = r / np.sqrt(var + self.eps)[:, None]
        return np.clip(scaled, -self.clip, self.clip).astype(np.float32).reshape(rewards.shape)


class BatchedPPO:
    """The members' PPOs (each built on its own config as a single run builds it; none `prepare`d) trained as one,
    on `envs`, the vector env of all their envs, from its first observations `obs`."""

    def __init__(self, members: list[PPO], obs: Any, clock: Stopwatch) -> None:
        self.members, self.clock, self.count = members, clock, len(members)
        first = members[0]
        self.envs_each, self.n_steps = first.cfg.env.num_envs, first.cfg.algo.n_steps
        self.activation = activation = covers(first.policy)[0]
        self.params = StackedParameters([m.policy for m in members], [m.optimizer for m in members])
        for m in members:  # each member's own actor: for its truncation bootstraps and its checkpoint
            m.actor = NumpyActor(m.policy, activation, m.np_rng)  # type: ignore[arg-type]
        self.actor = StackedActor(members, self.params, activation)
        self.loss = self.params.loss(first.policy, activation)
        layout = first.policy.layout
        self.buffer = RolloutBuffer(self.n_steps, self.count * self.envs_each, layout.stored_shape,
                                    layout.stored_dtype, first.policy.action_shape, first.policy.action_dtype,
                                    torch.device("cpu"))
        self.reward_scaler = StackedRewardScaler(members) if first.reward_scaler is not None else None
        for m in members:  # the batch's storage holds their rollouts
            m.buffer = None  # type: ignore[assignment]
        self.obs = obs
        self._split_obs()

    def _column(self, key: str) -> np.ndarray:
        """A setting of every member, [members, 1] (float64: each member's value as its config has it)."""
        return np.array([[float(getattr(m.settings, key))] for m in self.members])

    def _per_env(self, key: str) -> np.ndarray:
        return np.repeat([float(m.cfg.algo[key]) for m in self.members], self.envs_each)

    def evaluation_actor(self, rows: list[int]) -> StackedActor:
        """A StackedActor of members `rows` as their parameters are now, for their evaluation."""
        stats = None if self.actor.stats is None else self.actor.stats.subset(rows)
        return StackedActor([self.members[k] for k in rows], self.params.subset(rows), self.activation, stats)

    def _split_obs(self) -> None:
        for k, m in enumerate(self.members):  # each member's last observation, for its checkpoint
            m.obs = self.actor._member(self.obs, k)

    # --- one iteration ----------------------------------------------------------------------------------
    def collect(self, envs: gym.vector.VectorEnv, stop: Callable[[], bool], active: np.ndarray) -> list[Collected]:
        """n_steps steps of every member's envs (the `active` members' policies act; the others' envs get action 0);
        what each member collected (its share of the steps and the episodes that ended in its envs)."""
        self.actor.active = active
        self.actor.predraw(self.buffer.n_steps)
        try:
            with self.clock["storage"], self.actor.frozen():
                rollout = collect(envs, self.actor, self.buffer, self.obs, self.reward_scaler, stop, self.clock)
        finally:
            self.actor.predraw(None)
        if not stop():
            self.obs = rollout.obs
            self._split_obs()
        per = []
        owner = np.asarray(rollout.ended_in, dtype=np.int64) // self.envs_each
        for k in range(self.count):
            mine = np.flatnonzero(owner == k)
            per.append(Collected(None, None, rollout.steps // self.count, rollout.complete,
                                 [rollout.returns[i] for i in mine], [rollout.lengths[i] for i in mine], []))
        return per

    def learn(self, progress: list[float], active: np.ndarray) -> list[dict[str, float] | None]:
        """GAE, then the update of every `active` member (each at its own `progress`); the scalars of each (None
        for the members not active)."""
        for m, p in zip(self.members, progress, strict=True):
            m.schedule(p)
        with self.clock["advantages"], torch.no_grad():
            # V(last observation) by each member's torch policy, as its single run computes it (PPO.learn)
            last = torch.cat([m.policy.value(m.policy.prepare(as_tensors(m.obs)), None) for m in self.members])
            batch = self.buffer.advantages(last, self._per_env("gamma"), self._per_env("gae_lambda"))
            members = self._by_member(batch)
        with self.clock["update"], np.errstate(all="ignore"):
            stats = self._update(members, active.copy())
        return [m.scalars(s, b) if a else None
                for m, s, b, a in zip(self.members, stats, self._batches(members), active, strict=True)]

    def _by_member(self, batch: Batch) -> list[np.ndarray]:
        """The rollout's columns as [members, T * E, ...] arrays, each member's rows in its single run's order
        (t * E + env)."""
        t, k, e = self.n_steps, self.count, self.envs_each

        def regroup(col: torch.Tensor) -> np.ndarray:
            a = col.numpy().reshape(t, k, e, *col.shape[1:])
            return np.ascontiguousarray(a.swapaxes(0, 1)).reshape(k, t * e, *col.shape[1:])

        return [regroup(c) for c in (batch.obs, batch.actions, batch.logp, batch.values, batch.advantages,
                                     batch.returns)]

    @staticmethod
    def _batches(columns: list[np.ndarray]) -> list[Batch]:
        return [Batch(*(torch.from_numpy(c[k]) for c in columns)) for k in range(columns[0].shape[0])]

    def _update(self, columns: list[np.ndarray], active: np.ndarray) -> list[dict[str, float]]:
        """update.Updater.update for every member at once: K_epochs passes, each member's rows in its own shuffled
        order (its generator, as its single run draws it), its minibatch steps until its KL stops it."""
        first = self.members[0].settings
        n, size, members = columns[0].shape[1], first.batch_size, np.arange(self.count)
        clip_range = self._column("clip_range")
        clip_vf = None if first.clip_range_vf is None else self._column("clip_range_vf")
        ent, vf, max_norm = self._column("ent_coef"), self._column("vf_coef"), self._column("max_grad_norm")[:, 0]
        target_kl = None if first.target_kl is None else self._column("target_kl")[:, 0]
        self.params.forget_settings()  # the schedules have just set this update's learning rates
        taken: list[tuple[np.ndarray, np.ndarray]] = []  # per minibatch step: every member's row, who took it
        epochs = np.zeros(self.count)
        stopped, kl_stopped = ~active, np.zeros(self.count, dtype=bool)
        for _ in range(first.K_epochs):
            if stopped.all():
                break
            # Only the members still updating draw their shuffle, as their single runs would.
            order = np.stack([torch.randperm(n, generator=m.generator).numpy() if not stopped[k] else np.arange(n)
                              for k, m in enumerate(self.members)])
            # np.take on the flattened rows: advanced indexing c[members[:, None], order] gathers the same, slower
            flat = (order + members[:, None] * n).reshape(-1)
            shuffled = [np.take(c.reshape(-1, *c.shape[2:]), flat, axis=0).reshape(c.shape) for c in columns]
            for start in range(0, n, size):
                stats = self.loss.loss_and_grads(*(c[:, start:start + size] for c in shuffled), clip_range, clip_vf,
                                                 ent, vf, first.normalize_advantage)
                if target_kl is not None:
                    over = ~stopped & (stats[:, 3] > 1.5 * target_kl)
                    stopped |= over
                    kl_stopped |= over
                going = ~stopped
                if not going.any():
                    break
                norms = self.params.clip(max_norm, going)
                # each member's row as its single run's: the 5 statistics, the norm, whether it was clipped
                taken.append((np.concatenate([stats, norms[:, None], (norms > max_norm)[:, None]], axis=1), going))
                self.params.adam_step(going)
            epochs += ~stopped
        out = []
        for k in members:
            rows = [row[k] for row, going in taken if going[k]]
            means = np.mean(rows, axis=0).tolist() if rows else [0.0] * len(STAT_NAMES)
            row = dict(zip(STAT_NAMES, means, strict=True))
            row.update(minibatch_steps=float(len(rows)), epochs=float(epochs[k]),
                       stopped_early=float(kl_stopped[k]))
            out.append(row)
        return out
