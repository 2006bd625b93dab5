"""Checking the command line's overrides before Hydra composes: unknown keys and wrong types in one line, with a
suggestion, and the sweep plugins a command names but the install lacks."""

from __future__ import annotations

import difflib
import importlib.util
import shutil

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ppo_cli.config import GROUPS, TrainConfig
from ppo_cli.errors import UserError, extra_hint

FREE_FORM = ("env.kwargs.",)  # dicts whose keys the schema cannot know


def open_free_form(argv: list[str]) -> list[str]:
    """`env.kwargs.continuous=true` means add-or-set; Hydra would demand a `+` for a key not in the preset."""
    return [f"++{a}" if a.startswith(FREE_FORM) and "=" in a else a for a in argv]


SECTIONS = (*GROUPS, "eval")  # keys that hold keys: never the suggestion for a mistyped key
SWEEP_PARAMS = "hydra.sweeper.params."  # the Optuna sweeper's search space: its keys are config keys


def _check_sweeper_settings(argv: list[str]) -> None:
    """hydra.sweeper.<setting> of ppo-cli's own sweepers, checked by name (Hydra's "not in struct" would advise a
    '+', which only moves the typo into the sweep)."""
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra/sweeper=ppo_")]
    if not chosen:
        return
    from ppo_cli.cli.pbt import PBT_SETTINGS  # the sweepers' modules, only for their sweeps
    from ppo_cli.cli.tune import TUNE_SETTINGS, check_settings

    sweeper = chosen[-1]
    known = PBT_SETTINGS if sweeper == "ppo_pbt" else TUNE_SETTINGS
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra.sweeper.") and not key.startswith(SWEEP_PARAMS):
            check_settings({key[len("hydra.sweeper."):].split(".", 1)[0]: None}, known, sweeper)


def check_overrides(argv: list[str]) -> None:
    """Reject unknown keys and wrong types in one line, with a suggestion, before Hydra composes.

    `+key=value` and `++key=value` are checked like `key=value`: the schema has every key, so a `+` cannot add
    one (a run would train without it, and its checkpoint would not load); only the free-form dicts
    (env.kwargs) take new keys. `~key` cannot remove a key either. Group choices (env=...), hydra.* keys and
    malformed syntax are left to Hydra, except the keys of an Optuna search space (hydra.sweeper.params.<key>).
    """
    schema = OmegaConf.structured(TrainConfig)
    parser = OverridesParser.create()
    known = _leaf_keys(schema)
    _check_sweeper_settings(argv)
    for arg in argv:
        prefix = arg[:len(arg) - len(arg.lstrip("+~"))]
        if arg.startswith("-") or ("=" not in arg and prefix != "~"):
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - malformed syntax: Hydra's own message explains it best
            continue
        key = override.key_or_group
        where = ""
        if key.startswith(SWEEP_PARAMS):
            key, where = key[len(SWEEP_PARAMS):], f" in {SWEEP_PARAMS.rstrip('.')}"
        elif key.startswith(("hydra.", "hydra/")) or key == "hydra":
            continue
        if "/" in key or "@" in key or key in GROUPS or key.startswith(FREE_FORM):
            continue
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known - set(SECTIONS)), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else " (see the key tables in docs/configuration.md)"
            plus = "; a '+' cannot add keys: only env.kwargs takes new ones" if "+" in prefix else ""
            raise UserError(f"unknown config key {key!r}{where}{hint}{plus}")
        if where:
            continue
        if prefix == "~":
            raise UserError(f"{arg}: config keys cannot be removed; set {key}=<value> instead")
        if prefix == "+":
            raise UserError(f"{arg}: {key} is already in the config; set it without the '+': {arg[1:]}")
        if override.is_sweep_override():
            continue
        try:
            OmegaConf.update(schema, key, override.value(), merge=False)
        except Exception as exc:  # noqa: BLE001 - OmegaConf's validation errors have no common base we can name
            first = str(exc).strip().splitlines()[0]
            if "Integer" in first and isinstance(override.value(), float):
                first = "must be an integer (write 100000 or 100_000, not 1e5)"
            members = _enum_members(schema, key)
            if members and "expected one of" in first:  # OmegaConf lists aliases (async_) too
                first = f"expected one of [{', '.join(members)}]"
            raise UserError(f"{arg}: {first}") from None


def _enum_members(schema: DictConfig, key: str) -> list[str]:
    """The member names of an enum-typed key, aliases left out; [] for other keys."""
    parent_key, _, name = key.rpartition(".")
    parent = OmegaConf.select(schema, parent_key) if parent_key else schema
    node = parent._get_node(name) if isinstance(parent, DictConfig) else None
    enum_type = getattr(node, "enum_type", None)
    return [m.name for m in enum_type] if enum_type is not None else []


def _leaf_keys(node: DictConfig, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k in node.keys():
        full = f"{prefix}{k}"
        keys.add(full)
        child = node._get_node(k)
        if isinstance(child, DictConfig) and not full.startswith("env.kwargs"):
            keys |= _leaf_keys(child, full + ".")
    return keys


# Config groups that exist only with the sweep extra installed: (override prefix, plugin module).
SWEEP_PLUGINS = (("hydra/sweeper=ppo_", "optuna"),
                 ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher"),
                 ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


def check_sweep_plugins(argv: list[str]) -> None:
    for arg in argv:
        for prefix, module in SWEEP_PLUGINS:
            if arg.startswith(prefix) and not _installed(module):
                raise UserError(f"{arg} needs a Hydra plugin that is not installed ({module.split('.')[-1]}); "
                                f"{extra_hint('sweep')}")
        if arg.startswith("hydra/launcher=submitit_slurm") and shutil.which("srun") is None:
            raise UserError(f"{arg}: Slurm's srun is not on this machine's PATH; run the sweep from a Slurm login "
                            f"node (hydra/launcher=submitit_local runs the same jobs here)")
