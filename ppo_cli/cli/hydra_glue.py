"""Hydra's side of ppo-train: the config search path (--config-dir first) and Hydra's and YAML's errors as one
line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra.errors import CompactHydraException, MissingConfigException

from ppo_cli.errors import UserError


def user_configs_first(argv: list[str]) -> list[str]:
    """`--config-dir DIR`: a config in DIR wins over the packaged one of the same name.

    Hydra searches --config-dir after the packaged configs (pkg://ppo_cli.conf, the "main" entry of its search
    path), so a preset copied into DIR under its own name (hydra/sweeper/ppo_random.yaml, env/CartPole-v1.yaml,
    even config.yaml) would silently lose to the packaged one. Instead DIR goes into the search path just before
    the packaged configs. Hydra has no public hook for that order, so this wraps the function that builds the
    search path (hydra._internal.utils, hydra-core 1.3); without it, --config-dir keeps Hydra's order.
    """
    out: list[str] = []
    user_dir = None
    args = iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in ("--config-dir", "-cd"):
            user_dir = value if eq else next(args, None)
            if not user_dir:
                raise UserError(f"{flag} needs a folder")
        else:
            out.append(arg)
    if user_dir is None:
        return argv
    folder = Path(user_dir).resolve()
    if not folder.is_dir():
        raise UserError(f"--config-dir {user_dir}: no such folder")
    from hydra._internal import utils as hydra_internal
    from hydra.core.config_search_path import SearchPathQuery

    build = getattr(hydra_internal, "create_automatic_config_search_path", None)
    if build is None:
        return argv

    def user_dir_first(*args: Any, **kwargs: Any) -> Any:
        search_path = build(*args, **kwargs)
        search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="main"))
        return search_path

    hydra_internal.create_automatic_config_search_path = user_dir_first
    return out


def find(exc: BaseException, kind: type) -> Any:
    """`exc` or the first exception of type `kind` that it was raised from (Hydra and OmegaConf wrap them)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def yaml_message(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[-1]
    context = getattr(exc, "context", None)
    if mark is None:
        return f"a config file is not valid YAML ({problem})"
    context_mark = getattr(exc, "context_mark", None)
    started = (f" ({context} at line {context_mark.line + 1})" if context and context_mark is not None
               and context_mark.line != mark.line else "")
    return f"{mark.name}: not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}{started}"


def hydra_message(exc: CompactHydraException) -> str:
    """One of Hydra's composition errors, as one line."""
    if isinstance(exc, MissingConfigException) and exc.options:
        first = str(exc).strip().splitlines()[0]
        return f"{first}; the options are: {', '.join(exc.options)}"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.append(f"({str(cause).strip().splitlines()[0]})")
    return " ".join(lines) or type(exc).__name__
