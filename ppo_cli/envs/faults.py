"""The wrappers make_vec_env puts around every env to report a broken env's faults in one line, naming the env,
the call and the step (EnvFaults, ReportCalls)."""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import signal
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.vector.async_vector_env import AsyncState

from ppo_cli.errors import UserError, first_line


class EnvFault(UserError):
    """What EnvFaults raises: a broken env, in one line (the runner keeps what was trained before it)."""


class EnvCallFailed(Exception):
    """A sub-env's reset() or step() failed inside an async worker; the message says which call and how. (gymnasium
    re-raises a worker's exception in the main process by its type and message alone.)"""


def shape_problem(space: gym.Space, obs: Any) -> str | None:
    """What is wrong with the shape of one sub-env's observation `obs` for `space` (a Dict or Tuple part by part),
    or None."""
    if isinstance(space, (gym.spaces.Dict, gym.spaces.Tuple)):
        keys = list(space.spaces) if isinstance(space, gym.spaces.Dict) else list(range(len(space.spaces)))
        kind = dict if isinstance(space, gym.spaces.Dict) else tuple
        if not isinstance(obs, kind) or sorted(map(str, obs.keys() if kind is dict else range(len(obs)))) != \
                sorted(map(str, keys)):
            return f"an observation {_summary(obs)} where its observation space is {space}"
        for key in keys:
            problem = shape_problem(space[key], obs[key])
            if problem:
                return f"{problem} (observation key {key!r})"
        return None
    try:
        shape = np.shape(obs)
    except ValueError:  # a ragged nested list
        return f"an observation {_summary(obs)} that is not an array where its observation space is {space}"
    if shape != space.shape:
        return f"an observation of shape {shape} where its observation space {space} has shape {space.shape}"
    return None


def _summary(obs: Any) -> str:
    if isinstance(obs, dict):
        return f"with keys {sorted(map(str, obs))}"
    return f"of type {type(obs).__name__}"


def _left_to_caller(exc: BaseException) -> bool:
    """Whether `exc` is not an env fault to word here: ppo-cli's own errors, a missing dependency, and a failure of
    rendering (ppo-eval --video), which the callers word with their hints (extras to install, MUJOCO_GL)."""
    if isinstance(exc, (UserError, gym.error.DependencyNotInstalled)):
        return True
    return any(frame.f_code.co_name == "render" for frame, _ in traceback.walk_tb(exc.__traceback__))


def _raised(call: str, exc: BaseException) -> str:
    """'step() raised RuntimeError at custom_env.py:12: ...': the call, where it raised (the innermost frame: in a
    user's env, usually their own line) and the exception's first line."""
    text = str(exc).strip()
    text = f": {text.splitlines()[0]}" if text else ""
    frames = list(traceback.walk_tb(exc.__traceback__))
    where = f" at {Path(frames[-1][0].f_code.co_filename).name}:{frames[-1][1]}" if frames else ""
    return f"{call}() raised {type(exc).__name__}{where}{text}"


class ReportCalls(gym.Wrapper):
    """Inside each worker of an async vector env: a failing reset() or step() becomes an EnvCallFailed that says
    which of the two it was (the worker's own autoreset calls reset() from step()) and where it was raised, and an
    observation of the wrong shape is refused, which the async env's shared memory would otherwise broadcast into
    shape silently (an observation of one element fills every entry). Sync envs need neither: their traceback
    shows the call (EnvFaults reads it) and their batching refuses every wrong shape."""

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        try:
            obs, info = self.env.reset(**kwargs)
        except Exception as exc:  # noqa: BLE001 - a user's env can fail in any way
            if _left_to_caller(exc):
                raise
            raise EnvCallFailed(_raised("reset", exc)) from None
        self._check("reset", obs)
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        try:
            out = self.env.step(action)
        except Exception as exc:  # noqa: BLE001 - as in reset
            if _left_to_caller(exc):
                raise
            raise EnvCallFailed(_raised("step", exc)) from None
        self._check("step", out[0])
        return out

    def _check(self, call: str, obs: Any) -> None:
        problem = shape_problem(self.observation_space, obs)
        if problem:
            raise EnvCallFailed(f"{call}() returned {problem}")


def _float_parts(space: gym.Space) -> list[tuple[Any, ...]]:
    """The paths (keys into Dict / Tuple observations; () for the whole) of the parts that can hold NaN or inf."""
    if isinstance(space, gym.spaces.Dict):
        return [(key, *path) for key, sub in space.spaces.items() for path in _float_parts(sub)]
    if isinstance(space, gym.spaces.Tuple):
        return [(i, *path) for i, sub in enumerate(space.spaces) for path in _float_parts(sub)]
    return [()] if isinstance(space, gym.spaces.Box) and np.issubdtype(space.dtype, np.floating) else []


def _part(obs: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obs = obs[key]
    return obs


_SYNC_FILE = gym.vector.sync_vector_env.__file__
_BATCHING_DIR = str(Path(gym.vector.utils.__file__).parent)


class EnvFaults(gym.vector.VectorWrapper):
    """Turns what a broken env does into one UserError line naming the env, the call and the step: reset() or step()
    raising (sync or async; ReportCalls does the workers' part), an observation that does not fit the observation
    space, and a NaN or infinite observation (a truncated episode's final observation included) or reward. It
    also keeps the largest reward seen in absolute value (`largest_reward`), which explains an update that diverges.

    On the hot path it costs a few microseconds per step (under 2% of CartPole's training time, the cheapest case);
    the rest runs only when something is wrong.
    """

    def __init__(self, env: gym.vector.VectorEnv, label: str, evaluation: bool = False,
                 step_timeout: float | None = None) -> None:
        super().__init__(env)
        self.label = f"{'evaluation env' if evaluation else 'env'} {label!r}"
        # When the call in progress began (None between calls), for a note on a call that never returns (Stalls).
        self.call: tuple[str, float] | None = None
        self.step_timeout = step_timeout  # async workers only: a reset() or step() slower than this is a fault
        # The step in messages: env steps since the last reset(), all sub-envs (count_steps: the trainer's count).
        self.steps, self.stride = 0, self.num_envs
        self.largest_reward = 0.0
        space = env.single_observation_space
        self._paths = _float_parts(space)
        self._plain = self._paths == [()]  # the usual case: one float array, checked without the loop
        self._async = isinstance(env.unwrapped, gym.vector.AsyncVectorEnv)
        if self._async:
            # The parent logs a failed worker's traceback (as warnings) before it re-raises the exception, which is
            # reported here in one line instead.
            warnings.filterwarnings("ignore", message=".*ERROR: ", category=UserWarning,
                                    module=r"gymnasium\.vector\.async_vector_env")

    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        self.steps = 0
        try:
            obs, info = self._call("reset", seed=seed, options=options)
        except Exception as exc:  # noqa: BLE001 - a user's env can fail in any way
            if self._left_to_caller(exc):
                raise
            raise self._fault("reset", exc) from None
        finally:
            self.call = None
        self._check_obs("reset", obs)
        return obs, info

    def step(self, actions: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
        try:
            obs, rewards, terminated, truncated, info = self._call("step", actions)
        except Exception as exc:  # noqa: BLE001 - as in reset
            if self._left_to_caller(exc):
                raise
            raise self._fault("step", exc) from None
        finally:
            self.call = None
        # The cheapest exact checks measured (a few microseconds a step on CartPole): count_nonzero has none of
        # ndarray.all()'s Python wrapper; the rewards, one per env, are summed as Python floats, which never warn
        # (their sum is NaN or infinite when one of them is, or when the sum overflows: the slow path tells).
        if self._plain:
            if np.count_nonzero(np.isfinite(obs)) != obs.size:
                self._check_obs("step", obs)
        else:
            self._check_obs("step", obs)
        values = rewards.tolist()
        if not math.isfinite(sum(values)):
            self._check_rewards(rewards)
        largest = max(max(values), -min(values))
        if largest > self.largest_reward:
            self.largest_reward = largest
        # Episodes cut by a time limit: their real final observation (SAME_STEP autoreset), which the trainer
        # bootstraps from. A terminated episode's is never read, so it is not checked.
        if "final_obs" in info and np.count_nonzero(truncated):
            for obs_i in info["final_obs"][truncated & ~terminated]:
                self._check_obs("step", obs_i, "final observation (info['final_obs'])")
        self.steps += self.stride
        return obs, rewards, terminated, truncated, info

    def _check_obs(self, call: str, obs: Any, what: str = "observation") -> None:
        for path in self._paths:
            part = np.asarray(_part(obs, path))
            if not np.isfinite(part).all():
                kind = "a NaN" if np.isnan(part).any() else "an infinite"
                key = f" (observation key {path[0]!r})" if path else ""
                raise self._error(f"{call}() returned {kind} {what}{key}")

    def _check_rewards(self, rewards: np.ndarray) -> None:
        if not np.isfinite(rewards).all():
            kind = "a NaN" if np.isnan(rewards).any() else "an infinite"
            raise self._error(f"step() returned {kind} reward")

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """The vector env's reset() or step(); async workers with a step_timeout are waited for that long."""
        self.call = (name, time.monotonic())
        if self.step_timeout is None or not self._async:
            return getattr(self.env, name)(*args, **kwargs)
        getattr(self.env, f"{name}_async")(*args, **kwargs)
        try:
            return getattr(self.env, f"{name}_wait")(timeout=self.step_timeout)
        except multiprocessing.TimeoutError:
            raise self._error(self._hung(name)) from None

    def _hung(self, call: str) -> str:
        """Which workers did not answer `call` within step_timeout; all are then stopped (no answer will come)."""
        venv: Any = self.env.unwrapped
        late = [str(i) for i, pipe in enumerate(venv.parent_pipes) if not pipe.poll()]
        close_at_once(venv)
        return (f"sub-env {', '.join(late) or '?'} did not return from {call}() within env.step_timeout="
                f"{self.step_timeout:g} s; the workers were stopped")

    def _left_to_caller(self, exc: Exception) -> bool:
        # An async worker's ReportCalls wraps every failure of the env's calls but those it leaves to the caller,
        # whose traceback stayed in the worker; a worker that died breaks its pipe (_dead_workers).
        return _left_to_caller(exc) or (self._async and not isinstance(exc, (EnvCallFailed, EOFError, OSError)))

    def _fault(self, call: str, exc: Exception) -> EnvFault:
        if isinstance(exc, EnvCallFailed):
            return self._error(str(exc))
        if self._async:
            return self._error(self._dead_workers(call))
        return self._error(self._sync_fault(call, exc))

    def _dead_workers(self, call: str) -> str:
        """Which async workers ended during `call` and how (their exit codes); the others are then stopped, so that
        closing the envs waits for no reply that will never come."""
        venv: Any = self.env.unwrapped
        # The pipe broke as a process ended: its exit code follows at once. One wait for all of them, not a second
        # for each worker still alive.
        sentinels = [p.sentinel for p in venv.processes]
        ready = set(multiprocessing.connection.wait(sentinels, timeout=1.0))
        deadline = time.monotonic() + 0.2  # workers that die together end within moments of each other
        while ready and len(ready) < len(sentinels) and deadline > time.monotonic():
            more = multiprocessing.connection.wait([s for s in sentinels if s not in ready],
                                                   timeout=deadline - time.monotonic())
            ready.update(more)
        ended = []
        for i, process in enumerate(venv.processes):
            if process.sentinel in ready:
                process.join()  # its descriptors closed before its exit status is there to read: a moment
                ended.append(f"sub-env {i} ({_how_ended(process.exitcode)})")
        close_at_once(venv)
        which = ", ".join(ended) if ended else "a sub-env (it closed its pipe)"
        oom = " (SIGKILL: often the system's out-of-memory killer)" if "SIGKILL" in which else ""
        return f"the worker process of {which} ended during {call}(){oom}"

    def _sync_fault(self, call: str, exc: Exception) -> str:
        """What failed inside a sync vector env: the sub-env call in the traceback under its reset() or step() (a
        step's autoreset calls reset()), or the batching of the sub-envs' observations, which fails on a wrong
        shape."""
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
        inner = [i for i, frame in enumerate(frames) if frame.f_code.co_filename == _SYNC_FILE]
        below = frames[inner[-1] + 1:] if inner else []
        if below and below[0].f_code.co_name in ("reset", "step"):
            call = below[0].f_code.co_name
        elif any(frame.f_code.co_filename.startswith(_BATCHING_DIR) for frame in below):
            space = self.env.single_observation_space
            # The sub-envs' observations before batching, where this gymnasium keeps them: which one is wrong.
            observations = getattr(self.env.unwrapped, "_env_obs", None) or []
            problem = next(filter(None, (shape_problem(space, o) for o in observations)), None)
            return (f"{call}() returned {problem}" if problem else
                    f"{call}() returned an observation that does not fit its observation space {space} "
                    f"({first_line(exc)})")
        return _raised(call, exc)

    def _error(self, what: str) -> EnvFault:
        return EnvFault(f"{self.label}: {what} (at step {self.steps:,})")


def _how_ended(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-code}"


def kill_workers(envs: Any) -> None:
    """SIGKILL the worker processes of an async vector env (they ignore SIGINT and SIGTERM: run/signals.py)."""
    for process in getattr(getattr(envs, "unwrapped", None), "processes", ()):
        try:
            process.kill()
        except (OSError, ValueError):  # gone already, or closed
            pass


def close_at_once(envs: Any) -> None:
    """Close a vector env (wrappers and all) without waiting for the answer to a call in progress, which will not
    come: a dead or hung async worker, or one abandoned mid-call by a signal. Its workers are killed first; the
    async env is then told no call is pending, as its close would otherwise read the killed workers' pipes (an
    EOFError) for that answer."""
    kill_workers(envs)
    venv = getattr(envs, "unwrapped", envs)
    try:
        if isinstance(venv, gym.vector.AsyncVectorEnv):
            venv._state = AsyncState.DEFAULT
            envs.close(terminate=True)
        else:
            envs.close()
    except Exception:  # noqa: BLE001, S110 - closing what is already broken; the fault is what matters
        pass


def _faults(envs: gym.vector.VectorEnv) -> EnvFaults | None:
    env: Any = envs
    while env is not None and not isinstance(env, EnvFaults):
        env = getattr(env, "env", None)
    return env


def call_in_progress(envs: gym.vector.VectorEnv) -> tuple[str, str, float, int] | None:
    """(the env's label, the call, when it began (time.monotonic), the step) of a reset() or step() of `envs`
    (built by envs.make_vec_env) that has not returned yet; None between calls."""
    faults = _faults(envs)
    call = None if faults is None else faults.call
    return None if call is None else (faults.label, call[0], call[1], faults.steps)  # type: ignore[union-attr]


def steps_taken(envs: gym.vector.VectorEnv) -> int | None:
    """The env steps `envs` has taken, numbered as the trainer counts them (count_steps); None if unknown."""
    faults = _faults(envs)
    return None if faults is None else faults.steps


def largest_reward(envs: gym.vector.VectorEnv) -> float | None:
    """The largest reward in absolute value that `envs` (built by envs.make_vec_env) has returned; None if unknown."""
    faults = _faults(envs)
    return None if faults is None else faults.largest_reward


def count_steps(envs: gym.vector.VectorEnv, start: int, world: int = 1, stride: int | None = None) -> None:
    """Number the steps of `envs`' fault messages as the trainer counts them: from `start` (a resumed run's global
    step), by num_envs * `world` per step (a distributed run counts the steps of all its processes), or by `stride`
    (a batch of runs: one run's envs)."""
    faults = _faults(envs)
    if faults is not None:
        # A PettingZoo env's step counts once for its copies, whatever the agents (its rows: envs/agents.py)
        per_step = getattr(envs.unwrapped, "frames_per_step", faults.num_envs)
        faults.steps, faults.stride = start, stride or per_step * world
