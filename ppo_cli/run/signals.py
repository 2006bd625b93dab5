"""What SIGINT and SIGTERM do during a run (docs/evaluation-and-resume.md, "Stopping a run").

A stop always checkpoints an update boundary, so that stopping and resuming equals not stopping: a signal during a
rollout drops the rollout after the env step in progress (the runner saves the state at its start); during an
update, the update finishes first; an evaluation in progress is abandoned. A second signal ends the process at once
and keeps the last checkpoint written. Distributed runs stop between updates, all ranks together.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ppo_cli import distributed
from ppo_cli.distributed import Ranks

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


class EvaluationStopped(BaseException):
    """Raised by the signal handler into an evaluation in progress. A BaseException, like KeyboardInterrupt, so
    that no `except Exception` on the way (an env's, or the evaluation's own fault handling) takes it for an
    env failure."""


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
    runner ends its workers itself: envs.close(), or SIGKILL (a second signal).
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


def say(text: str) -> None:
    """One line on stderr from a signal handler: os.write, because the handler may run while the main thread is
    inside a print to the same stream, where a buffered write would raise "reentrant call"."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


def notice(signum: int, phase: str | None, distributed_run: bool, step: int, updates: int,
           update_seconds: float) -> str:
    """What the first signal prints: when the run will stop, given the phase it is in (`updates` done in this
    process so far, taking `update_seconds`)."""
    name = signal.Signals(signum).name
    if distributed_run:
        return f"ppo-train: {name}: every process stops after this update and saves a checkpoint"
    if phase == "rollout":
        what = (f"after the env step in progress; the rollout is dropped and the checkpoint holds step "
                f"{step:,}, where it started")
    elif phase == "update":
        what = "after this update" + (f" (about {update_seconds / updates:.1f} s, as long as the updates so far)"
                                      if updates else "")
    else:
        what = f"at step {step:,}"
    return f"ppo-train: {name}: stopping {what} (a second Ctrl-C or SIGTERM stops at once, keeping the last " \
           f"checkpoint)"


class StopSignals:
    """The run's stop requests: the first signal's number, the phase the run is in ("rollout", "update",
    "evaluation" or None), and what a signal does in each. `notice(signum)`: the line the first signal prints;
    `at_once(signum)`: ends the process on a second one."""

    def __init__(self, ranks: Ranks, notice: Callable[[int], str], at_once: Callable[[int], None]) -> None:
        self.ranks, self.notice, self.at_once = ranks, notice, at_once
        self.pid = os.getpid()
        self.signal: int | None = None
        self.phase: str | None = None

    def remember(self, signum: int, _frame: Any) -> None:
        """Before the run: keep the signal for its first boundary."""
        if os.getpid() == self.pid and self.signal is None:
            self.signal = signum

    def handle(self, signum: int, _frame: Any) -> None:
        """During the run: see the module doc."""
        if os.getpid() != self.pid:
            return  # an env worker forked (evaluation envs, built in the run) inherits this handler: it ignores
        if self.signal is not None:
            # One process: a second signal ends it at once. Under torchrun a rank may get a signal twice (from
            # the terminal or Slurm, and forwarded by torchrun, which later kills what is left): no escalation.
            if not self.ranks.active:
                self.at_once(signum)
            return
        self.signal = signum
        if self.phase == "evaluation":
            raise EvaluationStopped
        if self.ranks.main:
            say(self.notice(signum))

    def requested(self) -> bool:
        """Whether to drop the rollout in progress: one process only (distributed runs stop between updates)."""
        return self.signal is not None and not self.ranks.active

    def agreed(self) -> bool:
        """Whether to stop here; under torchrun every rank calls this at the same point and all agree."""
        return distributed.any_true(self.signal is not None, self.ranks)

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """An evaluation, which a stop signal abandons (EvaluationStopped)."""
        try:
            self.phase = "evaluation"
            if self.signal is not None:
                raise EvaluationStopped
            yield
        finally:
            self.phase = None
