"""`ppo-train`: compose the config with Hydra, check it, train, and report.

Everything the user can fix arrives here as a UserError and leaves as one line on stderr with exit code 2;
Hydra would print a traceback for any exception escaping the task function, so none may.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ppo_cli import checkpoint
from ppo_cli.config import GROUPS, TrainConfig, config_from_yaml, register_configs, validate
from ppo_cli.envs import check_env, env_label
from ppo_cli.errors import UserError, extra_hint
from ppo_cli.trainer import Interrupted, Trainer, TrainResult

register_configs()


def config_for_resume(data: dict, composed: DictConfig, overridden: list[str]) -> DictConfig:
    """The checkpoint's config, with the keys the user set on this command line taken from `composed`."""
    cfg = config_from_yaml(data["config_yaml"])
    for key in overridden:
        if key == "resume":
            continue
        if key in GROUPS:
            raise UserError(f"cannot change the config group {key!r} when resuming; override single keys "
                            f"(e.g. {key}.<name>=...) or start a new run")
        OmegaConf.update(cfg, key, OmegaConf.select(composed, key), merge=False)
    cfg.resume = composed.resume
    return cfg  # type: ignore[return-value]


def _overridden_keys() -> list[str]:
    keys = []
    for item in HydraConfig.get().overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.append(key)
    return keys


def run(cfg: DictConfig, run_dir: Path) -> TrainResult:
    data = None
    if cfg.resume:
        data = checkpoint.load(cfg.resume)
        cfg = config_for_resume(data, cfg, _overridden_keys())
    validate(cfg)
    if cfg.env.check:
        findings = check_env(cfg.env)
        print(f"env.check: {env_label(cfg.env)!r} passes gymnasium's env checker"
              + (" with warnings:" if findings else ""), flush=True)
        for line in findings:
            print(f"  - {line}", flush=True)
    trainer = Trainer(cfg, run_dir, resume=data)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    return result


def _report(result: TrainResult, run_dir: Path) -> float:
    ev = result.final_eval
    m, s = divmod(int(result.wall_time), 60)
    print(f"done: {result.global_step:,} steps in {m}m{s:02d}s of training ({result.sps:,.0f} SPS)"
          + (f", plus {result.eval_seconds:.1f} s evaluating" if result.eval_seconds else ""))
    if result.stopped_at:
        step, secs = result.stopped_at
        print(f"stopped early: eval.stop_at_return reached at step {step:,} after {secs:.1f} s of training")
    if result.best_eval:
        b = result.best_eval
        print(f"best evaluation: {b['mean_return']:.2f} +/- {b['std_return']:.2f} at step {b['global_step']:,} "
              f"(checkpoints/best.pt)")
    if ev is not None:
        print(f"final evaluation ({len(ev.returns)} episodes): {ev.mean_return:.2f} +/- {ev.std_return:.2f}")
    print(f"run dir:    {run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"evaluate:   ppo-eval {result.checkpoint}")
    _write_result(run_dir, {
        "status": "ok",
        "objective": result.objective if math.isfinite(result.objective) else None,
        "global_step": result.global_step,
        "wall_time": result.wall_time,
        "eval_seconds": result.eval_seconds,
        "sps": result.sps,
        "final_eval": ev.summary() if ev is not None else None,
        "best_eval": result.best_eval,
        "stopped_at_step": result.stopped_at[0] if result.stopped_at else None,
        "recent_train_return": result.recent_return,
        "checkpoint": str(result.checkpoint),
    })
    return result.objective


def _write_result(run_dir: Path, fields: dict) -> None:
    """result.json: what ppo-sweep-report reads. Written whole to a temp file and renamed, so a reader of a
    sweep still in progress never sees half a file."""
    hydra_cfg = HydraConfig.get()
    payload = {**fields, "overrides": list(hydra_cfg.overrides.task), "job": hydra_cfg.job.get("num")}
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "result.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, run_dir / "result.json")


def _failed(run_dir: Path, reason: str, started: float) -> float:
    _write_result(run_dir, {"status": "failed", "error": reason, "objective": None,
                            "wall_time": time.perf_counter() - started})
    return float("nan")


@hydra.main(version_base="1.3", config_path="pkg://ppo_cli.conf", config_name="config")
def _task(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    started = time.perf_counter()
    try:
        return _report(run(cfg, run_dir), run_dir)
    except UserError as exc:
        print(f"ppo-train: error: {exc}", file=sys.stderr, flush=True)
        if multirun:  # one bad job must not end the sweep: a NaN objective marks the trial failed
            return _failed(run_dir, str(exc), started)
        sys.exit(2)
    except Interrupted as exc:
        print(f"ppo-train: {exc} to {exc.path}\n"
              f"resume with: ppo-train resume={exc.path}", file=sys.stderr, flush=True)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if not multirun:
            raise
        # In a sweep, an unexpected crash of one job is recorded as that job's failure, and the sweep goes on.
        reason = f"{type(exc).__name__}: {exc}"
        print(f"ppo-train: job failed: {reason}", file=sys.stderr, flush=True)
        return _failed(run_dir, reason, started)


def _resume_run_dir(argv: list[str]) -> list[str]:
    """`resume=.../<run>/checkpoints/checkpoint.pt` continues in <run>: same TensorBoard curves, same folder.

    Hydra's own .hydra/ record is not rewritten there: the config of a resumed run is the checkpoint's.
    """
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if not resume or any(a.startswith("hydra.run.dir=") for a in argv) or "-m" in argv or "--multirun" in argv:
        return argv
    ckpt = Path(resume)
    if ckpt.parent.name != "checkpoints" or not ckpt.is_file():
        return argv
    return [*argv, f"hydra.run.dir={ckpt.parent.parent}", "hydra.output_subdir=null"]


FREE_FORM = ("env.kwargs.",)  # dicts whose keys the schema cannot know


def _open_free_form(argv: list[str]) -> list[str]:
    """`env.kwargs.continuous=true` means add-or-set; Hydra would demand a `+` for a key not in the preset."""
    return [f"++{a}" if a.startswith(FREE_FORM) and "=" in a else a for a in argv]


def check_overrides(argv: list[str]) -> None:
    """Reject unknown keys and wrong types in one line, with a suggestion, before Hydra composes.

    Hydra would catch these too, but with several lines of context; group choices (env=...), hydra.* keys,
    sweeps and +/~ edits are left to Hydra.
    """
    schema = OmegaConf.structured(TrainConfig)
    parser = OverridesParser.create()
    known = _leaf_keys(schema)
    for arg in argv:
        if arg.startswith(("-", "+", "~", "hydra.", "hydra/")) or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001 - malformed syntax: Hydra's own message explains it best
            continue
        key = override.key_or_group
        if key in GROUPS or key.startswith(FREE_FORM):
            continue
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else " (see the key tables in docs/configuration.md)"
            raise UserError(f"unknown config key {key!r}{hint}")
        if override.is_sweep_override():
            continue
        try:
            OmegaConf.update(schema, key, override.value(), merge=False)
        except Exception as exc:  # noqa: BLE001 - OmegaConf's validation errors have no common base we can name
            first = str(exc).strip().splitlines()[0]
            if "Integer" in first and isinstance(override.value(), float):
                first = "must be an integer (write 100000 or 100_000, not 1e5)"
            raise UserError(f"{arg}: {first}") from None


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
SWEEP_PLUGINS = (("hydra/sweeper=ppo_", "hydra_plugins.hydra_optuna_sweeper"),
                 ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper"),
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


def main() -> None:
    argv = _open_free_form(_resume_run_dir(sys.argv[1:]))
    try:
        check_sweep_plugins(argv)
        check_overrides(argv)
    except UserError as exc:
        print(f"ppo-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    _task()


if __name__ == "__main__":
    main()
