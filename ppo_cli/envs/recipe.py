"""A config read from a file (a checkpoint, an exported model) is data, whoever wrote the file.

Nothing in it is imported, located, instantiated or interpolated unless the user says so: `--trust-env-code`
(`trust_env_code=true` for a resume), or the key set on their own command line. This module finds what such a
config would run, so the entry points can refuse it before anything is built.

The exceptions are an allowlist of callables identified by what they are, not by a name's prefix: a `_target_` or
entry point is looked up only among modules already imported, through their and their classes' own `__dict__`
(no import, no module `__getattr__`, no descriptor: looking runs no code), and passes only if the object found is
one of the allowlist's. `gymnasium.utils.seeding.np.savez` finds numpy.savez and is refused; an alias of an allowed
wrapper passes. Their arguments must be plain data: no nested `_target_`, no Hydra keys, no interpolation.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from ppo_cli.errors import UserError

# Wrappers a file may name: each takes the env and plain data, and writes nothing (no RecordVideo) and calls
# nothing it is given (no Transform*/Lambda*).
ALLOWED_WRAPPERS = (
    "ppo_cli.wrappers.KeepObservationIndices",
    *(f"gymnasium.wrappers.{name}" for name in (
        "TimeLimit", "OrderEnforcing", "PassiveEnvChecker", "RecordEpisodeStatistics", "ClipAction",
        "RescaleAction", "StickyAction", "ClipReward", "NormalizeReward", "NormalizeObservation",
        "FlattenObservation", "FilterObservation", "DtypeObservation", "GrayscaleObservation",
        "ResizeObservation", "ReshapeObservation", "RescaleObservation", "TimeAwareObservation",
        "FrameStackObservation", "DelayObservation", "MaxAndSkipObservation", "AtariPreprocessing")),
    *(f"minigrid.wrappers.{name}" for name in (
        "ImgObsWrapper", "RGBImgObsWrapper", "RGBImgPartialObsWrapper", "FullyObsWrapper", "ReseedWrapper")),
    # SuperSuit's, for PettingZoo envs (the pistonball preset)
    *(f"supersuit.{name}" for name in (
        "color_reduction_v0", "resize_v1", "frame_stack_v1", "dtype_v0", "flatten_v0", "reshape_v0",
        "normalize_obs_v0", "clip_reward_v0", "clip_actions_v0", "frame_skip_v0", "sticky_actions_v0",
        "pad_observations_v0", "pad_action_space_v0", "black_death_v3")),
)
# Unregistered envs a file may name as env.entry_point: ppo-cli's examples.
ALLOWED_ENTRY_POINTS = ("ppo_cli.example_envs:MaskedGrid", "ppo_cli.example_envs:GoalReach")
# Modules a file's `module:Id` env id may import: importing each only registers its envs.
ENV_MODULES = ("ppo_cli.example_envs", "gymnasium_robotics", "ale_py", "minigrid", "popgym")

# PettingZoo packages whose `PACKAGE:ENV_MODULE` ids a file may name: the id imports PACKAGE.ENV_MODULE, one of the
# package's env modules, and builds its env (agents.pettingzoo_source takes nothing else of these packages).
PETTINGZOO_PACKAGES = ("pettingzoo.classic", "pettingzoo.butterfly", "pettingzoo.sisl", "pettingzoo.atari", "mpe2")

MAX_SHOWN = 80  # characters of a value read from a file that a refusal echoes


@cache
def _allowed(names: tuple[str, ...]) -> dict[int, str]:
    """id(object) -> its name, for the allowlist's own names, imported by this code (never by a file's word). A name
    this gymnasium lacks is left out."""
    found = {}
    for name in names:
        module, _, attr = name.replace(":", ".").rpartition(".")
        try:
            found[id(getattr(importlib.import_module(module), attr))] = name
        except (ImportError, AttributeError):
            continue
    return found


def lookup(reference: str) -> Any:
    """What `reference` ("a.b.C" or "a.b:C") names among the modules already imported, found without running code;
    None where it names nothing there."""
    parts = reference.replace(":", ".").split(".")
    for i in range(len(parts), 0, -1):
        obj = sys.modules.get(".".join(parts[:i]))
        if obj is not None:
            break
    else:
        return None
    for name in parts[i:]:
        try:
            obj = vars(obj)[name]
        except (TypeError, KeyError):
            return None
    return obj


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def show(value: Any) -> str:
    """A value from a file as a refusal echoes it: printable characters only (no terminal escapes), cut short."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def _is_named(path: str, named: Sequence[str]) -> bool:
    """Whether the user set `path`, or a key above it, on their command line."""
    return any(path == key or path.startswith(key + ".") or path.startswith(key + "[") for key in named)


def interpolations(node: Any, path: str, named: Sequence[str] = ()) -> list[str]:
    """`path=value` for every string under `node` (a plain container, as read) that OmegaConf would resolve."""
    if _is_named(path, named):
        return []
    if isinstance(node, Mapping):
        return [f for k, v in node.items() for f in interpolations(v, f"{path}.{k}" if path else str(k), named)]
    if isinstance(node, (list, tuple)):
        return [f for i, v in enumerate(node) for f in interpolations(v, f"{path}[{i}]", named)]
    if isinstance(node, str) and "${" in node:
        return [f"{path}={show(node)} (an interpolation)"]
    return []


def _not_plain(node: Any, path: str) -> list[str]:
    """Why the arguments under `node` are not plain data: a `_target_` (Hydra would build it) or another Hydra key."""
    if isinstance(node, Mapping):
        out = []
        for k, v in node.items():
            key = f"{path}.{k}"
            if k == "_target_":
                out.append(f"{key}={show(v)} (a nested target)")
            elif isinstance(k, str) and k.startswith("_") and k.endswith("_") and k != "_args_":
                out.append(f"{key}={show(v)} (a Hydra instantiation key)")
            else:
                out += _not_plain(v, key)
        return out
    if isinstance(node, (list, tuple)):
        return [f for i, v in enumerate(node) for f in _not_plain(v, f"{path}[{i}]")]
    return []


def _callable_problem(reference: Any, allowed: tuple[str, ...]) -> str | None:
    """Why `reference` is not one of `allowed`, or None where it is."""
    if not isinstance(reference, str) or not reference:
        return "not a name"
    known = _allowed(allowed)  # first: it imports the allowlist's own modules, where the lookup then finds them
    obj = lookup(reference)
    if obj is not None and id(obj) in known:
        return None
    if obj is None:
        return "not on the allowlist"
    return f"is {show(_describe(obj))}, not on the allowlist"


def code_in_recipe(env: Mapping[str, Any], named: Sequence[str] = ()) -> list[str]:
    """What the env recipe `env` (a plain container, unresolved) would import or call beyond the allowlist, as
    `key=value (why)` strings; keys in `named` (set by the user on this command line) are the user's own choice."""
    found: list[str] = []
    entry_point = env.get("entry_point")
    if entry_point and not _is_named("env.entry_point", named):
        why = _callable_problem(entry_point, ALLOWED_ENTRY_POINTS)
        if why:
            found.append(f"env.entry_point={show(entry_point)} ({why})")
    env_id = str(env.get("id", ""))
    if ":" in env_id and not _is_named("env.id", named):
        module, _, name = env_id.rpartition(":")
        if module not in ENV_MODULES and not (module in PETTINGZOO_PACKAGES and name.isidentifier()):
            found.append(f"env.id={show(env_id)} (imports module {show(module)})")
    wrappers = env.get("wrappers") or []
    if not _is_named("env.wrappers", named):
        for i, wrapper in enumerate(wrappers if isinstance(wrappers, (list, tuple)) else [wrappers]):
            key = f"env.wrappers[{i}]"
            if not isinstance(wrapper, Mapping) or "_target_" not in wrapper:
                found.append(f"{key}={show(wrapper)} (not a {{_target_: ...}} mapping)")
                continue
            why = _callable_problem(wrapper["_target_"], ALLOWED_WRAPPERS)
            if why:
                found.append(f"{key}._target_={show(wrapper['_target_'])} ({why})")
            found += _not_plain({k: v for k, v in wrapper.items() if k != "_target_"}, key)
    for k, v in env.items():  # a target anywhere else is built by nothing of ours, so it has no business there
        if k not in ("wrappers", "entry_point", "id") and not _is_named(f"env.{k}", named):
            found += _not_plain(v, f"env.{k}")
    return found


def refusal(found: Sequence[str], what: str, source: str, how: str) -> UserError:
    """The one line that refuses a file's config for what it would run or resolve."""
    doing = ("env recipe would import or call code" if all(f.startswith("env.") and "(an interpolation)" not in f
                                                          for f in found)
             else "config would import, call or resolve")
    return UserError(f"the {what}'s {doing}: {', '.join(found)}; refused, nothing was run. If you trust {source}, "
                     f"add {how}")


def check(config: Mapping[str, Any], *, trusted: bool, what: str, source: str, how: str,
          named: Sequence[str] = (), env_only: bool = False) -> None:
    """Refuse `config` (a file's, plain and unresolved: the whole run config, or with env_only its env recipe) where
    it would import, call or interpolate anything the user did not ask for."""
    if trusted:
        return
    env = config if env_only else config.get("env") or {}
    found = interpolations(config, "env" if env_only else "", named)
    if isinstance(env, Mapping):
        found += code_in_recipe(env, named)
    if found:
        raise refusal(found, what, source, how)
