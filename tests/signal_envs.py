"""Envs for the stop and resume tests (tests/test_interrupts.py), imported by the tests' subprocesses as
`tests.signal_envs`. Each is CartPole (whose state env snapshots save) with one behaviour added."""

import os
import signal
import threading
import time

from gymnasium.envs.classic_control.cartpole import CartPoleEnv


class SignalAt(CartPoleEnv):
    """Sends its own process `signum` from inside its `at`-th step (counted across episodes), as a Ctrl-C lands in
    the middle of a rollout. Once per process, and only while the class is `armed`: a test's uninterrupted run
    disarms it."""

    armed = True

    def __init__(self, at: int = 40, signum: int = int(signal.SIGINT), render_mode=None):
        super().__init__(render_mode=render_mode)
        self.at, self.signum, self.steps = at, signum, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.at and SignalAt.armed:
            SignalAt.armed = False
            os.kill(os.getpid(), self.signum)
        return super().step(action)


class HangAt(CartPoleEnv):
    """Its `at`-th step never returns (a simulator that lost its connection)."""

    def __init__(self, at: int = 200, render_mode=None):
        super().__init__(render_mode=render_mode)
        self.at, self.steps = at, 0

    def step(self, action):
        self.steps += 1
        while self.steps >= self.at:
            time.sleep(3600)
        return super().step(action)


class Unsaveable(CartPoleEnv):
    """Holds a handle that an env snapshot cannot save: a resume resets its episodes (with a note)."""

    def __init__(self, render_mode=None):
        super().__init__(render_mode=render_mode)
        self.connection = threading.Lock()


class SlowStart(CartPoleEnv):
    """Takes 5 s to build (a simulator that loads its assets)."""

    def __init__(self, render_mode=None):
        time.sleep(5)
        super().__init__(render_mode=render_mode)


class DieAt(CartPoleEnv):
    """Its process ends at its `at`-th step with exit code `code`, as a simulator's crash takes the worker down."""

    def __init__(self, at: int = 20, code: int = 3, render_mode=None):
        super().__init__(render_mode=render_mode)
        self.at, self.code, self.steps = at, code, 0

    def step(self, action):
        self.steps += 1
        if self.steps >= self.at:
            os._exit(self.code)
        return super().step(action)


class FailsInEvaluation(CartPoleEnv):
    """Fails at reset on the evaluation envs' seeds (seed + 10000 and up): a training run that breaks when it
    evaluates."""

    def reset(self, *, seed=None, options=None):
        if seed is not None and seed >= 10_000:
            raise RuntimeError("the evaluation simulator did not start")
        return super().reset(seed=seed, options=options)
