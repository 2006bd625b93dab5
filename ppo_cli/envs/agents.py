"""Several agents in one env: PettingZoo's parallel API as one gymnasium vector env of rows (algo=ippo / mappo).

`env.id=mpe2:simple_spread_v3` names a PettingZoo env the PettingZoo way, PACKAGE:ENV_MODULE (a module holding
`parallel_env()` and `env()`); `module:callable` names a factory of one. `ParallelVectorEnv` holds env.num_envs
copies of it and gives each (copy, agent) pair a row: row c * A + i is agent i of copy c, for A =
len(possible_agents). The one policy (parameters shared by all agents) then acts for every row at once, and GAE,
truncation bootstraps, masks and episode statistics are per row, so per agent, as for one agent.

Each row's observation is a Dict: the agent's own observation (under "obs", or its own keys where it is a Dict,
such as PettingZoo classic's "observation" and "action_mask"), "agent_id" (the one-hot of i) and "state" (the
env's global `state()` where it has one, else every agent's observation flattened and joined). The policy reads
what its algorithm says (actor_critic.build_policy): IPPO's actor and critic the agent's own observation, MAPPO's
critic the global state too; network.agent_id adds the agent id to both.

Agents that finish early, or join late, leave their rows idle: an idle row's observation is zeros (an all-true
action mask where the env masks), its reward 0, and the rollout stores it as not `alive`, so the update drops it
(storage.RolloutBuffer.alive). An agent's own end is its row's episode end (its return and length in
info["episode"]); a copy's end (every agent gone) resets the copy in the same step (SAME_STEP) and reports the
team's return, the sum over its agents, in info["team"].
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from ppo_cli.envs.recipe import ENV_MODULES, PETTINGZOO_PACKAGES
from ppo_cli.envs.spaces import MASK_KEY
from ppo_cli.errors import UserError, extra_hint

AGENT_ID, STATE, GROUP, OBS = "agent_id", "state", "group", "obs"
RESERVED = (AGENT_ID, STATE, GROUP)


def agent_group(name: str) -> str:
    """An agent's group: its name without a trailing _N (PettingZoo's adversary_0, adversary_1 -> adversary)."""
    head, sep, tail = name.rpartition("_")
    return head if sep and head and tail.isdigit() else name


def _same(label: str, what: str, spaces: dict[str, gym.Space], need: str) -> None:
    names = list(spaces)
    differ = [n for n in names if spaces[n] != spaces[names[0]]]
    if differ:
        raise UserError(f"{label!r}: the agents' {what} spaces differ ({names[0]}: {spaces[names[0]]}, {differ[0]}: "
                        f"{spaces[differ[0]]}); {need}")


def _is_image(space: gym.Space) -> bool:
    parts = space.spaces.values() if isinstance(space, gym.spaces.Dict) else (space,)
    return any(isinstance(s, gym.spaces.Box) and len(s.shape) >= 2 and s.dtype == np.uint8 for s in parts)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            return None
        raise


def pettingzoo_source(env_id: str) -> tuple[Callable[..., Any], str] | None:
    """(factory, "parallel" or "aec") where `env_id` names a PettingZoo env (PACKAGE:ENV_MODULE, or a
    module:callable returning a PettingZoo env), else None (a gymnasium id)."""
    package, _, name = env_id.rpartition(":")
    if not package or not name.isidentifier():
        return None
    try:
        module = _module(f"{package}.{name}")
    except Exception as exc:  # noqa: BLE001 - a third-party module may fail to import in any way
        raise UserError(f"env.id={env_id!r}: cannot import {package}.{name} ({type(exc).__name__}: {exc})") from None
    if module is not None:
        if hasattr(module, "parallel_env"):
            return module.parallel_env, "parallel"
        if hasattr(module, "env"):
            return module.env, "aec"
        return None
    if package in PETTINGZOO_PACKAGES or package in ENV_MODULES:
        # A file may name these without --trust-env-code (recipe.py) to import them, never to call what they hold.
        return None
    try:
        parent = _module(package)
    except Exception:  # noqa: BLE001
        return None
    factory = getattr(parent, name, None) if parent is not None else None
    if factory is None or not callable(factory) or isinstance(factory, type) and issubclass(factory, gym.Env):
        return None
    return factory, "factory"


def env_kind(env_id: str, kwargs: dict[str, Any]) -> tuple[Callable[..., Any], str]:
    """(factory, "parallel" or "aec") of a PettingZoo env id; a module:factory is asked by building one env."""
    factory, kind = pettingzoo_source(env_id)  # type: ignore[misc]
    if kind == "factory":
        try:
            probe = factory(**kwargs)
        except Exception as exc:  # noqa: BLE001 - constructing a (third-party) env can fail in any way
            raise UserError(f"env.id={env_id!r}: the env could not be created with env.kwargs={kwargs} "
                            f"({type(exc).__name__}: {exc})") from None
        kind = _kind(probe)
        if hasattr(probe, "close"):
            probe.close()
    return factory, kind


def is_multi_agent(env_cfg: Any) -> bool:
    """Whether env.id names a PettingZoo env (a parallel or AEC one)."""
    return not env_cfg.get("entry_point") and pettingzoo_source(str(env_cfg.id)) is not None


def _kind(env: Any) -> str:
    from pettingzoo.utils.env import AECEnv, ParallelEnv

    if isinstance(env, ParallelEnv):
        return "parallel"
    if isinstance(env, AECEnv):
        return "aec"
    # Wrappers and third-party envs that follow the API without the base class
    return "parallel" if hasattr(env, "possible_agents") and not hasattr(env, "agent_selection") else "aec"


def parallel_factory(env_id: str, kwargs: dict[str, Any]) -> Callable[[], Any]:
    """A factory of the parallel env `env_id` names, or one line saying why it cannot be one."""
    if pettingzoo_source(env_id) is None:
        raise UserError(f"env.id={env_id!r}: not a PettingZoo env (PACKAGE:ENV_MODULE with parallel_env(), such "
                        f"as mpe2:simple_spread_v3, or module:factory)")
    factory, kind = env_kind(env_id, kwargs)

    def make() -> Any:
        try:
            env = factory(**kwargs)
        except Exception as exc:  # noqa: BLE001 - constructing a (third-party) env can fail in any way
            raise UserError(f"env.id={env_id!r}: the env could not be created with env.kwargs={kwargs} "
                            f"({type(exc).__name__}: {exc})") from None
        if _kind(env) == "aec":
            raise UserError(f"env.id={env_id!r} is an AEC (turn-based) env, but algo=ippo / mappo step every agent "
                            f"at once: use algo=selfplay for a two-player turn-based game, or, where its agents "
                            f"act simultaneously, a factory returning pettingzoo.utils.conversions."
                            f"aec_to_parallel(env) (env.id=module:factory)")
        return env

    if kind == "aec":
        make()  # the message above
    return make


def _keyed(parts: dict[str, Any], group: str | None) -> dict[str, Any]:
    """An agent's own observation keys (or their spaces) as its row names them: "group/key" where the groups' spaces
    differ, the action mask shared by all groups."""
    return parts if group is None else {k if k == MASK_KEY else f"{group}/{k}": v for k, v in parts.items()}


def _zeros(space: gym.Space) -> Any:
    if isinstance(space, gym.spaces.Dict):
        return {k: _zeros(s) for k, s in space.spaces.items()}
    if isinstance(space, gym.spaces.Box):
        return np.zeros(space.shape, space.dtype)
    if isinstance(space, gym.spaces.Discrete):
        return np.asarray(space.start, space.dtype)
    if isinstance(space, gym.spaces.MultiDiscrete):
        return np.asarray(space.start, space.dtype)
    return np.zeros(space.shape, space.dtype)


class ParallelVectorEnv(gym.vector.VectorEnv):
    """env.num_envs copies of a PettingZoo parallel env, one row per (copy, agent): see the module doc."""

    def __init__(self, make: Callable[[], Any], copies: int, label: str) -> None:
        self.copies_ = [make() for _ in range(copies)]
        first = self.copies_[0]
        self.agent_names = list(first.possible_agents)
        self.agents_per_copy = a = len(self.agent_names)
        self.num_envs, self.frames_per_step, self.label = copies * a, copies, label
        obs_spaces = {n: first.observation_space(n) for n in self.agent_names}
        act_spaces = {n: first.action_space(n) for n in self.agent_names}
        self.group_names = sorted({agent_group(n) for n in self.agent_names})
        self.agent_groups = [self.group_names.index(agent_group(n)) for n in self.agent_names]
        for g, group in enumerate(self.group_names):
            _same(label, "observation", {n: obs_spaces[n] for n, ag in zip(self.agent_names, self.agent_groups,
                                                                          strict=True) if ag == g},
                  f"the agents of group {group!r} (a name without its _N) share a policy and need one observation "
                  f"space")
        _same(label, "action", act_spaces, "ppo-cli's policies, one shared or one per group (network.share=false), "
                                           "need one action space")
        self.single_action_space = act_spaces[self.agent_names[0]]
        # One space per group: where the groups' spaces differ, each has keys of its own ("adversary/obs"), read by
        # its own policy (network.share=false; policy/groups.py).
        self.group_spaces = [obs_spaces[self.agent_names[self.agent_groups.index(g)]]
                             for g in range(len(self.group_names))]
        self.grouped = any(s != self.group_spaces[0] for s in self.group_spaces)
        own: dict[str, gym.Space] = {}
        for g, space in enumerate(self.group_spaces if self.grouped else self.group_spaces[:1]):
            own.update(self._own_keys(space, self.group_names[g] if self.grouped else None))
        mask = own.get(MASK_KEY)
        self.mask_all = None if mask is None else np.ones(mask.shape, mask.dtype)
        clash = [k for k in own if k in RESERVED]
        if clash:
            raise UserError(f"{label!r}: the agents' observation has a key {clash[0]!r}, which ppo-cli adds itself "
                            f"(the agent id, group and global state)")
        state_space = getattr(first, "state_space", None)
        self.own_state = isinstance(state_space, gym.spaces.Box) and len(state_space.shape) == 1
        if not self.own_state:
            state_space = (None if any(_is_image(s) for s in obs_spaces.values()) else
                           gym.spaces.Box(-np.inf, np.inf, (sum(gym.spaces.flatdim(s) for s in obs_spaces.values()),),
                                          np.float32))
        # No flat global state (an image's, such as the butterfly envs'): no "state" key, and algo=mappo says so.
        self.with_state = state_space is not None
        extra = {AGENT_ID: gym.spaces.Box(0.0, 1.0, (a,), np.float32)}
        if len(self.group_names) > 1:
            extra[GROUP] = gym.spaces.Box(0.0, 1.0, (len(self.group_names),), np.float32)
        if self.with_state:
            extra[STATE] = gym.spaces.Box(-np.inf, np.inf, state_space.shape, np.float32)
        self.single_observation_space = gym.spaces.Dict({**own, **extra})
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        self.metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, **getattr(first, "metadata", {})}
        self.metadata["autoreset_mode"] = AutoresetMode.SAME_STEP
        self.render_mode, self.spec = None, None
        self.alive = np.zeros(self.num_envs, dtype=bool)
        self.ep_return, self.ep_length = np.zeros(self.num_envs), np.zeros(self.num_envs, dtype=np.int64)
        self.team_length = np.zeros(copies, dtype=np.int64)
        self.team_return = np.zeros(self.num_envs)  # each agent's return in its copy's episode so far
        self.seeds: list[int | None] = [None] * copies
        self.recorder: Callable[[Any, bool], None] | None = None  # ppo-eval --video: copy 0's frames (record_video)
        # Constant parts of each agent's row: its one-hots, and zeros under the other groups' keys.
        ids, groups = np.eye(a, dtype=np.float32), np.eye(len(self.group_names), dtype=np.float32)
        self._fixed = []
        for i, g in enumerate(self.agent_groups):
            fixed = {AGENT_ID: ids[i], **({GROUP: groups[g]} if GROUP in extra else {})}
            if self.grouped:
                for h, space in enumerate(self.group_spaces):
                    if h != g:
                        fixed.update({k: v for k, v in self._own(self._idle(space), h).items() if k != MASK_KEY})
            self._fixed.append(fixed)

    @staticmethod
    def _own_keys(space: gym.Space, group: str | None) -> dict[str, gym.Space]:
        return _keyed(dict(space.spaces) if isinstance(space, gym.spaces.Dict) else {OBS: space}, group)

    # --- observations ------------------------------------------------------------------------------------
    def _state(self, env: Any, obs: dict[str, Any]) -> np.ndarray:
        if self.own_state:
            return np.asarray(env.state(), np.float32).reshape(-1)
        spaces = [self.group_spaces[g] for g in self.agent_groups]
        return np.concatenate([gym.spaces.flatten(space, obs[n]).astype(np.float32) if n in obs
                               else np.zeros(gym.spaces.flatdim(space), np.float32)
                               for n, space in zip(self.agent_names, spaces, strict=True)])

    def _own(self, value: Any, g: int) -> dict[str, Any]:
        return _keyed(dict(value) if isinstance(value, dict) else {OBS: value},
                      self.group_names[g] if self.grouped else None)

    def _rows(self, env: Any, obs: dict[str, Any]) -> list[dict[str, Any]]:
        """The observation of each agent of one copy as its row sees it (an idle agent's: zeros)."""
        state = self._state(env, obs) if self.with_state else None
        rows = []
        for i, name in enumerate(self.agent_names):
            g = self.agent_groups[i]
            row = {**self._fixed[i], **self._own(obs[name] if name in obs else self._idle(self.group_spaces[g]), g)}
            if self.mask_all is not None and MASK_KEY not in row:  # a group without masks: every action allowed
                row[MASK_KEY] = self.mask_all
            if state is not None:
                row[STATE] = state
            rows.append(row)
        return rows

    @staticmethod
    def _idle(space: gym.Space) -> Any:
        idle = _zeros(space)
        if isinstance(idle, dict) and MASK_KEY in idle:
            idle[MASK_KEY] = np.ones_like(idle[MASK_KEY])  # no allowed action would be no distribution
        return idle

    def _batch(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return {k: np.stack([r[k] for r in rows]) for k in self.single_observation_space.spaces}

    # --- the vector env API ------------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int] | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        a = self.agents_per_copy
        if seed is not None:
            self.seeds = ([seed + c for c in range(len(self.copies_))] if isinstance(seed, int)
                          else [seed[c * a] for c in range(len(self.copies_))])
        rows = []
        for c, env in enumerate(self.copies_):
            rows += self._reset_copy(c, env, self.seeds[c], options)
            self.seeds[c] = None  # a copy's later episodes go on from its own stream
        self.ep_return[:], self.ep_length[:], self.team_length[:], self.team_return[:] = 0.0, 0, 0, 0.0
        return self._batch(rows), {}

    def _reset_copy(self, c: int, env: Any, seed: int | None, options: dict[str, Any] | None = None
                    ) -> list[dict[str, Any]]:
        obs, _ = env.reset(seed=seed, options=options)
        a = self.agents_per_copy
        self.alive[c * a:(c + 1) * a] = [n in obs for n in self.agent_names]
        if c == 0 and self.recorder is not None:
            self.recorder(env.render(), "reset")
        return self._rows(env, obs)

    def step(self, actions: Any) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        n, a = self.num_envs, self.agents_per_copy
        rewards = np.zeros(n, np.float64)
        terminated, truncated = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        ended_agent, ended_team = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        ep_r, ep_l = np.zeros(n), np.zeros(n, dtype=np.int64)
        team_r, team_l, team_a = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros((n, a))
        final_obs = np.full(n, None, dtype=object)
        rows: list[dict[str, Any]] = []
        for c, env in enumerate(self.copies_):
            base = c * a
            acting = {name: actions[base + i] for i, name in enumerate(self.agent_names) if self.alive[base + i]}
            obs, rew, term, trunc, _ = env.step(acting)
            if c == 0 and self.recorder is not None:  # the last frame too, before the copy resets
                self.recorder(env.render(), "step" if env.agents else "end")
            was_alive = self.alive[base:base + a].copy()
            copy_rows = self._rows(env, obs)
            for i, name in enumerate(self.agent_names):
                r = base + i
                if was_alive[i]:
                    rewards[r] = float(rew.get(name, 0.0))
                    terminated[r], truncated[r] = bool(term.get(name, False)), bool(trunc.get(name, False))
                    self.ep_return[r] += rewards[r]
                    self.team_return[r] += rewards[r]
                    self.ep_length[r] += 1
                    if terminated[r] or truncated[r]:
                        final_obs[r] = {k: np.array(v) for k, v in copy_rows[i].items()}  # no row shares arrays
                        ended_agent[r], ep_r[r], ep_l[r] = True, self.ep_return[r], self.ep_length[r]
                        self.ep_return[r], self.ep_length[r] = 0.0, 0
                # An agent that joins (or rejoins) starts its row's next episode here.
                self.alive[r] = name in obs and name in env.agents
            self.team_length[c] += 1
            if not env.agents:  # the copy's episode is over: a new one at once (SAME_STEP)
                returns = self.team_return[base:base + a]
                ended_team[base], team_r[base], team_l[base] = True, returns.sum(), self.team_length[c]
                team_a[base] = returns
                self.ep_return[base:base + a], self.ep_length[base:base + a], self.team_length[c] = 0.0, 0, 0
                self.team_return[base:base + a] = 0.0
                copy_rows = self._reset_copy(c, env, None)
            elif not self.alive[base:base + a].all():
                idle = self._rows(env, {})  # once for the copy, not once per idle agent
                copy_rows = [row if self.alive[base + i] else idle[i] for i, row in enumerate(copy_rows)]
            rows += copy_rows
        info: dict[str, Any] = {}
        if ended_agent.any():
            info["episode"], info["_episode"] = {"r": ep_r, "l": ep_l}, ended_agent
            info["final_obs"], info["_final_obs"] = final_obs, ended_agent
        if ended_team.any():
            info["team"], info["_team"] = {"r": team_r, "l": team_l, "a": team_a}, ended_team
        return self._batch(rows), rewards, terminated, truncated, info

    # --- checkpoints (make.snapshot / restore): the copies' own attributes, where they are plain data ---------
    _COUNTS = ("alive", "ep_return", "ep_length", "team_length", "team_return")

    def snapshot_state(self, snapshot_obj: Callable[[Any], dict], plain: Callable[[Any], Any]) -> dict[str, Any]:
        """Raises TypeError naming what cannot be saved (a physics engine's objects, say)."""
        return {"copies": [snapshot_obj(env) for env in self.copies_],  # env.wrappers' state too
                "counts": {k: plain(getattr(self, k)) for k in self._COUNTS}}

    def restore_state(self, state: dict[str, Any], restore_obj: Callable[[Any, dict[str, Any]], None],
                      unplain: Callable[[Any], Any]) -> None:
        for env, saved in zip(self.copies_, state["copies"], strict=True):
            restore_obj(env, saved)
        for key in self._COUNTS:
            setattr(self, key, unplain(state["counts"][key]))

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        # A row is an agent, not an env: per-env methods (masks.py's action_masks) do not apply. Masks come in
        # each agent's observation.
        raise AttributeError(name)

    def close_extras(self, **kwargs: Any) -> None:
        for env in self.copies_:
            env.close()

    def render(self) -> Any:
        return self.copies_[0].render()


def agent_means(returns: list[list[float]], names: list[str]) -> tuple[dict[str, float], float]:
    """Each agent's mean return over team episodes (`returns`: one list per episode, in the env's agent order),
    by name, and their mean over the agents (BenchMARL's episode_reward_mean)."""
    means = np.mean(np.asarray(returns), axis=0)
    return {name: float(m) for name, m in zip(names, means, strict=True)}, float(means.mean())


def check_algorithm(env_cfg: Any, multi_agent: str | None) -> None:
    """One line where the env and algo.multi_agent do not go together: a PettingZoo env needs algo=ippo / mappo
    (parallel envs) or algo=selfplay (AEC games), and those need a PettingZoo env."""
    env_id = str(env_cfg.id)
    source = None if env_cfg.get("entry_point") else pettingzoo_source(env_id)
    if source is not None:
        source = env_kind(env_id, dict(env_cfg.get("kwargs") or {}))
    if source is None:
        package = env_id.rpartition(":")[0]
        if multi_agent is not None and package and importlib.util.find_spec(package.split(".")[0]) is None:
            raise UserError(f"env.id={env_id!r}: cannot import {package!r}; {extra_hint('multiagent')}")
        if multi_agent is not None:
            raise UserError(f"algo={multi_agent} trains the agents of a PettingZoo env (env.id=PACKAGE:ENV_MODULE, "
                            f"such as mpe2:simple_spread_v3); env.id={env_id!r} is a gymnasium env: use algo=ppo")
        return
    kind = source[1]
    if multi_agent is None:
        what = ("algo=selfplay (a two-player turn-based game)" if kind == "aec"
                else "algo=ippo or algo=mappo (its agents act at once)")
        raise UserError(f"env.id={env_id!r} is a PettingZoo env: train it with {what}")
    if multi_agent == "selfplay" and kind == "parallel":
        raise UserError(f"algo=selfplay plays two-player turn-based (AEC) games such as pettingzoo.classic:"
                        f"tictactoe_v3; env.id={env_id!r} is a parallel env: use algo=ippo or algo=mappo")
    if multi_agent != "selfplay" and kind == "aec":
        parallel_factory(env_id, dict(env_cfg.get("kwargs") or {}))  # its one line: use selfplay, or convert it
