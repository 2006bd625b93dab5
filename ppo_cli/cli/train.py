"""`ppo-train`: compose the config with Hydra, check it, train, and report.

Everything the user can fix arrives here as a UserError and leaves as one line on stderr with exit code 2.
Hydra would print a traceback (or several lines) for any exception escaping it, so main() asks Hydra to raise
instead (HYDRA_FULL_ERROR) and reports what arrives: a UserError, a YAML syntax error in a config file, or one
of Hydra's own composition errors, each as one line. The pieces: run_folder.py (claiming and locking run
folders), overrides.py (checking the command line), hydra_glue.py (search path, error lines), report.py (what is
printed and recorded).

Torch is imported where a run starts (`run`), not here: `ppo-train --help`, argument errors and sweep launchers
do not pay for it (benchmarks/startup.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ppo_cli import __version__, distributed
from ppo_cli.cli import sweep_report
from ppo_cli.cli.hydra_glue import find, hydra_message, user_configs_first, yaml_message
from ppo_cli.cli.overrides import check_overrides, check_sweep_plugins, open_free_form
from ppo_cli.cli.report import banner, failed, report, sweep_summary, write_result
from ppo_cli.cli.run_folder import (
    INFO_FLAGS,
    RunFolderTaken,
    claim,
    discard_failed_start,
    is_multirun,
    prepare_named_folder,
    resume_run_dir,
    unlock,
)
from ppo_cli.config import GROUPS, config_from_yaml, env_label, register_configs, stored_config, validate
from ppo_cli.envs import recipe
from ppo_cli.errors import UserError
from ppo_cli.run.signals import Interrupted

if TYPE_CHECKING:
    from ppo_cli.run.runner import TrainResult

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
    # A tuning sweep's job reported to its trial; the same checkpoint resumed on its own reports to none.
    for key in ("storage", "study", "trial"):
        if f"tune.{key}" not in overridden and cfg.get("tune") is not None:
            cfg.tune[key] = None
    return cfg  # type: ignore[return-value]


def _overridden_keys() -> list[str]:
    keys = []
    for item in HydraConfig.get().overrides.task:
        key = item.split("=", 1)[0].lstrip("+~")
        keys.append(key)
    return keys


def resumed(cfg: DictConfig) -> tuple[DictConfig, dict | None]:
    """The config to train and, for `resume=PATH`, the checkpoint's state: its config with the keys set on this
    command line (config_for_resume), after the checks a resume needs. A new run: (cfg, None)."""
    if not cfg.resume:
        return cfg, None
    from ppo_cli.run import checkpoint  # torch: imported once a run starts

    data = checkpoint.load(cfg.resume)
    overridden = _overridden_keys()
    # The user's word on this command line, never the checkpoint's; the keys they set are theirs.
    recipe.check(stored_config(data["config_yaml"]), trusted=bool(cfg.trust_env_code), what="checkpoint",
                 source=str(cfg.resume), how="trust_env_code=true (or set those keys on the command line)",
                 named=overridden)
    cfg = config_for_resume(data, cfg, overridden)
    if int(data["global_step"]) >= cfg.algo.total_timesteps:
        raise UserError(f"{cfg.resume} is at step {int(data['global_step']):,}, already at or past "
                        f"algo.total_timesteps={cfg.algo.total_timesteps:,}: nothing to train; set a larger "
                        f"algo.total_timesteps to train on (ppo-eval {cfg.resume} evaluates it as it is)")
    return cfg, data


def run(cfg: DictConfig, run_dir: Path) -> tuple[TrainResult, DictConfig]:
    """Train; the result, and the config trained (a resume's is the checkpoint's, with the keys set here)."""
    from ppo_cli.envs.make import check_env  # the stages that need torch, imported once a run starts
    from ppo_cli.policy.actor_critic import settle_network
    from ppo_cli.run.runner import Runner

    cfg, data = resumed(cfg)
    validate(cfg)
    why = settle_network(cfg)  # network=auto decided before the banner, which names the encoder
    validate(cfg)  # again, on what was decided: network.precision=bfloat16 needs an image encoder
    banner(cfg, run_dir, int(data["global_step"]) if data else 0, why)
    if cfg.env.check:
        findings = check_env(cfg.env)
        print(f"env.check: {env_label(cfg.env)!r} passes gymnasium's env checker"
              + (" with warnings:" if findings else ""), flush=True)
        for line in findings:
            print(f"  - {line}", flush=True)
    started = time.perf_counter()
    trainer = Runner(cfg, run_dir, resume=data)
    try:
        result = trainer.run()
    except UserError as exc:  # it failed while training: the run folder says why, beside the curves it logged
        failed(run_dir, str(exc), started)
        raise
    finally:
        trainer.close()
    return result, cfg


@hydra.main(version_base="1.3", config_path="pkg://ppo_cli.conf", config_name="config")
def _task(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    started = time.perf_counter()
    try:
        claim(run_dir, resuming=bool(cfg.resume), multirun=multirun)
        result, trained = run(cfg, run_dir)
        return report(result, run_dir, trained)
    except RunFolderTaken as exc:  # the folder is another run's: its result.json is not this job's to write
        print(f"ppo-train: error: {exc}", file=sys.stderr, flush=True)
        if multirun:
            return None
        sys.exit(2)
    except UserError as exc:
        print(f"ppo-train: error: {exc}", file=sys.stderr, flush=True)
        if multirun:  # one bad job must not end the sweep: the job is recorded as failed and the sweep goes on
            return failed(run_dir, str(exc), started)
        discard_failed_start()
        sys.exit(2)
    except Interrupted as exc:  # exit 130 (SIGINT) or 143 (SIGTERM), as the shell reports a process they ended
        print(f"ppo-train: {exc}", file=sys.stderr, flush=True)
        if multirun:  # the sweep's record says so, not "running" forever
            write_result(run_dir, {"status": "interrupted", "error": str(exc), "objective": None,
                                   "global_step": exc.step, "checkpoint": str(exc.path)})
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if not multirun:
            raise
        # In a sweep, an unexpected crash of one job is recorded as that job's failure, and the sweep goes on.
        reason = f"{type(exc).__name__}: {exc}"
        print(f"ppo-train: job failed: {reason}", file=sys.stderr, flush=True)
        return failed(run_dir, reason, started)
    finally:
        if multirun:  # the next job of this process may not need it, but nothing else may take it meanwhile
            unlock(run_dir)


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"ppo-train: error: {message}", file=sys.stderr, flush=True)
    discard_failed_start()
    sys.exit(code)


def main() -> None:
    if distributed.from_environment().active:
        distributed.exit_after(_main)  # ends the process itself: why in exit_after
    else:
        _main()


def _main() -> None:
    argv = sys.argv[1:]
    if "--version" in argv:
        print(f"ppo-cli {__version__}")
        return
    argv = distributed.prepare_cli(argv)  # under torchrun: ranks other than 0 stay quiet
    user_wants_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what goes wrong instead of printing it; reported below
    multirun = is_multirun(argv)
    try:
        argv = user_configs_first(open_free_form(resume_run_dir(argv)))
        check_sweep_plugins(argv)
        check_overrides(argv)
        prepare_named_folder(argv)
        sys.argv = [sys.argv[0], *argv]
        _task()
    except KeyboardInterrupt:  # Ctrl-C outside Runner.run (which stops at an update boundary): nothing to save
        print("ppo-train: interrupted by SIGINT while starting or closing the run; checkpoints already written are "
              "kept", file=sys.stderr, flush=True)
        discard_failed_start()
        sys.exit(130)
    except Exception as exc:
        user = find(exc, UserError)
        if user is not None:
            _fail(str(user))
        if user_wants_tracebacks:
            raise
        syntax = find(exc, yaml.YAMLError)
        if syntax is not None:
            _fail(yaml_message(syntax))
        if isinstance(exc, CompactHydraException):
            _fail(hydra_message(exc))
        sweep_dir = sweep_report.RecordSweepDir.last if multirun else None
        if sweep_dir is not None and sweep_dir.is_dir() and sweep_summary(sweep_dir):
            # e.g. the Optuna sweeper, asked for its best trial when every trial failed
            _fail(f"every job of the sweep failed (see each job's result.json in {sweep_dir})", 1)
        if distributed.from_environment().active:  # one line per rank (stderr names it), not N tracebacks
            first = (str(exc).strip().splitlines() or [""])[0]
            _fail(f"{type(exc).__name__}: {first}", 1)
        raise
    if multirun and not any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        sweep_dir = sweep_report.RecordSweepDir.last
        if sweep_dir is not None and sweep_summary(sweep_dir):
            _fail(f"every job of the sweep failed (see each job's result.json in {sweep_dir})", 1)


if __name__ == "__main__":
    main()
