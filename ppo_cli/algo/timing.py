"""Where training time goes: a stopwatch of named stages, used as context managers.

    clock = Stopwatch(("env", "policy", "storage", ...))
    with clock["storage"]:          # the rollout loop ...
        with clock["env"]: ...      # ... minus what nested stages took: each stage counts its own time only

Stages nest, and each counts its *self* time, so the stages add up to the wall time spent inside them. Each
stage's timer is made once and reused (the rollout enters two per env step), and costs well under a
microsecond per use.
"""

from __future__ import annotations

from collections.abc import Iterable
from time import perf_counter
from typing import Any


class _Stage:
    __slots__ = ("watch", "name", "started", "nested")

    def __init__(self, watch: Stopwatch, name: str) -> None:
        self.watch, self.name, self.started, self.nested = watch, name, 0.0, 0.0

    def __enter__(self) -> _Stage:
        self.nested = 0.0
        self.watch._open.append(self)
        self.started = perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        elapsed = perf_counter() - self.started
        open_stages = self.watch._open
        open_stages.pop()
        self.watch.seconds[self.name] += elapsed - self.nested
        if open_stages:
            open_stages[-1].nested += elapsed


class Stopwatch:
    """Seconds of self time per stage (see the module doc)."""

    def __init__(self, stages: Iterable[str]) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(stages, 0.0)
        self._stages = {name: _Stage(self, name) for name in self.seconds}
        self._open: list[_Stage] = []

    def __getitem__(self, stage: str) -> _Stage:
        return self._stages[stage]

    def total(self) -> float:
        return sum(self.seconds.values())
