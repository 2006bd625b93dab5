"""torch.compile for the two hot functions it can take, the update's minibatch loss (ppo.py) and the rollout's
policy step (rollout.TorchActor), with a fallback: where compiling fails (no C++ compiler for the CPU backend, an
op or a Python construct the compiler refuses), the run says so in one line and goes on uncompiled."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ppo_cli.errors import first_line

_DISABLE_WRAPPER = os.path.join("torch", "_compile.py")  # where torch._disable_dynamo's wrapper is defined


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
            say(f"note: torch_compile: torch.compile could not compile {what} ({first_line(e)}); it runs uncompiled")
            chosen = fn
            return fn(*args, **kwargs)
        chosen = compiled
        return out

    return call


def skip_dynamo_import(*classes: type) -> None:
    """Keep torch._dynamo (about 1 s to import) out of a run that compiles nothing.

    torch.optim wraps its methods (add_param_group, state_dict, zero_grad, ...) in torch._disable_dynamo, whose
    wrapper imports torch._dynamo at its first call, to ask dynamo not to trace the method, and caches the answer
    on the method as `__dynamo_disable`. A run that compiles nothing has no dynamo to ask: the method itself is
    cached there instead, so the wrapper calls it directly. Call it only where nothing compiles (torch_compile=false):
    ppo-cli compiles the loss and the policy step alone, which never call into an optimizer, so a later compiling
    run in the same process is unaffected either way."""
    for cls in classes:
        for klass in cls.__mro__:
            for attr in vars(klass).values():
                fn, code = getattr(attr, "__wrapped__", None), getattr(attr, "__code__", None)
                if (fn is not None and code is not None and code.co_filename.endswith(_DISABLE_WRAPPER)
                        and getattr(fn, "__dynamo_disable", None) is None):
                    fn.__dynamo_disable = fn
