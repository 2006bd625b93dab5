"""hydra/launcher=ppo_batched: the jobs of a sweep trained in this process, those that can be as batches
(run/batched.py), so `ppo-train -m seed=1,2,3,4,5,6,7,8 hydra/launcher=ppo_batched` is one batched run of 8 members.

Each job is set up as Hydra's basic launcher sets it up (its folder, its .hydra/ config files, the callbacks), then
the jobs are grouped: those whose configs differ only in algo.batched.MEMBER_KEYS form a batch (at most
max_members each). Each member is reported as a run of its own (its console summary, its result.json with
"batched_with": the batch's size, its objective returned to the sweeper). A batch the batched path does not cover
(a CNN or recurrent policy, action masks, envpool) trains its members one after another here, saying why.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, run_job, setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from ppo_cli.cli.report import banner, failed, report, write_result
from ppo_cli.cli.run_folder import RunFolderTaken, claim, unlock
from ppo_cli.config import validate
from ppo_cli.errors import UserError
from ppo_cli.run.signals import Interrupted


@dataclass
class Job:
    ret: JobReturn
    hydra: DictConfig  # the job's Hydra config (write_result reads its overrides and number)
    cfg: DictConfig
    run_dir: Path
    started: float
    resume: dict | None = None  # a resumed job's checkpoint (cli/train.py resumed)
    failed: bool = False  # recorded as failed (or its folder is another run's): nothing more to do for it


def _register(into: dict, cfg: DictConfig) -> None:
    """The task function run_job calls: remembers the job instead of training it."""
    into.update(cfg=cfg, run_dir=Path(HydraConfig.get().runtime.output_dir), hydra=HydraConfig.instance().cfg)


def batch_key(cfg: DictConfig) -> str:
    """Jobs with equal keys can train as one batch: their configs differ only in the member keys (whether
    clip_range_vf and target_kl are set at all changes the update's shape, so that stays in the key)."""
    from ppo_cli.algo.batched import MEMBER_KEYS

    plain = OmegaConf.to_container(cfg, resolve=True)
    for key in MEMBER_KEYS:
        node, *path = key.split(".")
        holder: Any = plain
        for part in [node, *path][:-1]:
            holder = holder[part]
        last = [node, *path][-1]
        holder[last] = "set" if holder.get(last) is not None else None
    for key in ("resume", "tune"):
        plain.pop(key, None)
    return OmegaConf.to_yaml(OmegaConf.create(plain))


def _set_hydra(job: Job) -> None:
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": job.hydra.hydra}))


def _single(job: Job, batched_with: int = 1) -> None:
    """Train one job as ppo-train trains a run."""
    from ppo_cli.cli.train import run

    result, trained = run(job.cfg, job.run_dir)
    job.ret.return_value = report(result, job.run_dir, trained, {"batched_with": batched_with})


def _batch(jobs: list[Job]) -> Interrupted | None:
    """Train `jobs` as one batch (or one by one where they cannot be); the first Interrupted, where a signal
    stopped them."""
    from ppo_cli.run.batched import BatchedRunner, NotBatchable

    try:
        runner = BatchedRunner([(j.cfg, j.run_dir) for j in jobs], [j.resume for j in jobs])
    except NotBatchable as exc:
        print(f"note: these {len(jobs)} runs train one after another: {exc}", flush=True)
        for job in jobs:
            _set_hydra(job)
            stopped = _guarded(job, partial(_single, job))
            if stopped is not None:
                return stopped
        return None
    except Exception as exc:  # noqa: BLE001 - a batch that cannot be built fails its members, not the sweep
        for job in jobs:
            _set_hydra(job)
            _failed(job, exc, len(jobs))
        return None
    print(f"batch: {len(jobs)} runs in one process (hydra/launcher=ppo_batched)", flush=True)
    for job in jobs:
        _set_hydra(job)
        banner(job.cfg, job.run_dir, int(job.resume["global_step"]) if job.resume else 0)
    try:
        outcomes: list[Any] = runner.run()
    except Exception as exc:  # noqa: BLE001 - what stops the batch stops the members still training: each says so
        outcomes = [exc if o is None else o for o in runner.outcomes]
    finally:
        runner.close()
    stopped = None
    for job, outcome in zip(jobs, outcomes, strict=True):
        _set_hydra(job)
        if isinstance(outcome, Interrupted):
            _interrupted(job, outcome, len(jobs))
            stopped = stopped or outcome
        elif isinstance(outcome, Exception):
            _failed(job, outcome, len(jobs))
        else:
            job.ret.return_value = report(outcome, job.run_dir, job.cfg, {"batched_with": len(jobs)})
    return stopped


def _failed(job: Job, exc: Exception, batched_with: int) -> None:
    job.failed = True
    reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    print(f"ppo-train: error: [{job.run_dir.name}] {reason}", file=sys.stderr, flush=True)
    failed(job.run_dir, reason, job.started, {"batched_with": batched_with})


def _interrupted(job: Job, exc: Interrupted, batched_with: int) -> None:
    print(f"ppo-train: [{job.run_dir.name}] {exc}", file=sys.stderr, flush=True)
    write_result(job.run_dir, {"status": "interrupted", "error": str(exc), "objective": None,
                               "global_step": exc.step, "checkpoint": str(exc.path), "batched_with": batched_with})


def _guarded(job: Job, work: Any) -> Interrupted | None:
    """Run `work` for `job`: a UserError or a crash is recorded as the job's failure, as a sweep does; a stop signal
    as its interruption (returned)."""
    try:
        work()
    except RunFolderTaken as exc:
        job.failed = True
        print(f"ppo-train: error: {exc}", file=sys.stderr, flush=True)
    except Interrupted as exc:
        _interrupted(job, exc, 1)
        return exc
    except Exception as exc:  # noqa: BLE001 - one job's failure or crash must not end the sweep
        _failed(job, exc, 1)
    return None


def _prepare(job: Job) -> None:
    from ppo_cli.cli.train import resumed
    from ppo_cli.policy.actor_critic import settle_network

    claim(job.run_dir, resuming=bool(job.cfg.resume), multirun=True)
    job.cfg, job.resume = resumed(job.cfg)

    validate(job.cfg)
    settle_network(job.cfg)
    validate(job.cfg)


def launch(hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int, settings: dict[str, Any]) -> list[JobReturn]:
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    max_members = int(settings.get("max_members") or 64)
    jobs: list[Job] = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        seen: dict[str, Any] = {}
        ret = run_job(hydra_context=hydra_context, task_function=partial(_register, seen), config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        jobs.append(Job(ret, seen["hydra"], seen["cfg"], seen["run_dir"], time.perf_counter()))
    groups: dict[str, list[Job]] = {}
    try:
        for job in jobs:
            _set_hydra(job)
            _guarded(job, partial(_prepare, job))
            if not job.failed:
                groups.setdefault(batch_key(job.cfg), []).append(job)
        stopped = None
        for group in groups.values():
            for start in range(0, len(group), max_members):
                batch = group[start:start + max_members]
                if len(batch) == 1:
                    _set_hydra(batch[0])
                    stopped = _guarded(batch[0], partial(_single, batch[0]))
                else:
                    stopped = _batch(batch)
                if stopped is not None:
                    sys.exit(128 + stopped.signum)
    finally:
        for job in jobs:
            unlock(job.run_dir)
    return [job.ret for job in jobs]
