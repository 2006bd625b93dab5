"""A note on stderr when an env call has not returned for a minute: an env that hangs (a simulator that lost its
connection, a deadlock) is otherwise silent, and a sync env's call cannot be cut short. env.step_timeout stops an
async env by itself; this only tells, once per call, and says how to stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ppo_cli.envs.faults import call_in_progress
from ppo_cli.run.signals import say

STALL_SECONDS = 60.0  # a call this long is worth a note: an Atari or MuJoCo step takes milliseconds


class Stalls:
    """Watches the envs `envs()` returns (the training envs, the evaluation envs once built) from a daemon
    thread, which also calls `tick` about once a second (the console's progress between updates); `close` stops
    it."""

    def __init__(self, envs: Callable[[], Iterable[Any]], after: float | None = None,
                 tick: Callable[[], None] | None = None) -> None:
        self.envs, self.after, self.tick = envs, STALL_SECONDS if after is None else after, tick
        self._stop = threading.Event()
        self._told: set[tuple[str, float]] = set()
        self._thread = threading.Thread(target=self._watch, name="ppo-cli-stalls", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.after / 4)):
            try:
                self._look()
            except Exception:  # noqa: BLE001, S112 - a glance that failed (an env closing under it): try again later
                continue

    def _look(self) -> None:
        if self.tick is not None:
            self.tick()
        for envs in self.envs():
            call = None if envs is None else call_in_progress(envs)
            if call is None or (call[0], call[2]) in self._told:
                continue
            label, name, began, step = call
            waited = time.monotonic() - began
            if waited >= self.after:
                self._told.add((label, began))
                say(f"note: {label} has not returned from {name}() for {waited:.0f} s (at step {step:,}): a hung "
                    f"env? Ctrl-C stops the run and keeps its last checkpoint; with env.vectorization=async, "
                    f"env.step_timeout=SECONDS stops such a call by itself")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)  # it holds the envs: they must not outlive the run
