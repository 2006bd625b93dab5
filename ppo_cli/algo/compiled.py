"""torch.compile for the two hot functions it can take, the update's minibatch loss (ppo.py) and the rollout's
policy step (rollout.TorchActor), with a fallback: where compiling fails (no C++ compiler for the CPU backend, an
op or a Python construct the compiler refuses), the run says so in one line and goes on uncompiled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def with_fallback(fn: Callable[..., Any], what: str, say: Callable[[str], None]) -> Callable[..., Any]:
    """`fn` through torch.compile, compiled at its first call; if that call fails, `say` one note and use `fn`
    itself from then on (an error of `fn`'s own then surfaces from the uncompiled call, as without compiling)."""
    compiled = torch.compile(fn)
    chosen: Callable[..., Any] | None = None

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal chosen
        if chosen is not None:
            return chosen(*args, **kwargs)
        try:
            out = compiled(*args, **kwargs)
        except Exception as e:
            say(f"note: torch_compile: torch.compile could not compile {what} ({_reason(e)}); it runs uncompiled")
            chosen = fn
            return fn(*args, **kwargs)
        chosen = compiled
        return out

    return call
