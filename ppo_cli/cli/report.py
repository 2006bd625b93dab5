"""What ppo-train prints and records: the banner before training, the summary after it, result.json (what
ppo-sweep-report reads), and a sweep's one-line summary."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ppo_cli import distributed
from ppo_cli.cli import sweep_report
from ppo_cli.cli.run_folder import reason
from ppo_cli.config import choice, env_label
from ppo_cli.envs import recipe
from ppo_cli.errors import UserError

if TYPE_CHECKING:  # the runner's types, for annotations only: importing it would import torch
    from ppo_cli.run.runner import TrainResult

def banner(cfg: DictConfig, run_dir: Path, start_step: int = 0, why: str = "") -> None:
    """Before training: where the run goes, what it trains, with which network (`why`: why network=auto picked
    it), and how many steps it will take (whole updates)."""
    from ppo_cli.devices import choose_device, precision_text, torch_threads  # torch: imported as a run starts

    a, e = cfg.algo, cfg.env
    world = distributed.from_environment().world
    rollout = a.n_steps * e.num_envs * world
    updates = max(-(-(a.total_timesteps - start_step) // rollout), 0)
    end = start_step + updates * rollout
    device = choose_device(cfg)
    n = f"{updates:,}{' more' if start_step else ''} {'update' if updates == 1 else 'updates'} of {rollout:,}"
    steps = f"from step {start_step:,} to {end:,} = {n}" if start_step else f"{end:,} steps = {n}"
    if end != a.total_timesteps and updates:
        steps += (f" (algo.total_timesteps={a.total_timesteps:,} is not a whole number of rollouts: the run stops "
                  f"after the update that reaches it)")
    from ppo_cli.envs.make import native_vectorization

    vectorized = "envpool" if choice(e.backend) == "envpool" else choice(e.vectorization)
    if vectorized == "auto":
        vectorized = "native" if native_vectorization(e) else "sync"
    rows_of_agents = choice(a.get("multi_agent")) in ("ippo", "mappo")  # docs/multi-agent.md
    if rows_of_agents:
        vectorized = "copies, a row per agent: returns are the team's"
    n_threads = torch_threads(cfg)
    threads = "" if device.device.type != "cpu" or not n_threads else (
        f", {n_threads} torch thread{'s' if n_threads > 1 else ''}")
    print(f"run dir:    {run_dir}\n"
          f"env:        {_env_text(cfg)} x {e.num_envs} envs ({vectorized}), seed {cfg.seed}\n"
          f"network:    {_network_text(cfg.network)}{f' (network=auto: {why})' if why else ''}\n"
          f"device:     {device.device.type} ({device.reason}){threads}{precision_text(cfg, device.device)}\n"
          f"rollout:    algo.n_steps {a.n_steps:,} x env.num_envs {e.num_envs}"
          f"{f' x {world} processes' if world > 1 else ''} = {rollout:,} steps per update"
          f"{' (a sample per agent each)' if rows_of_agents else ''}; "
          f"algo.batch_size {a.batch_size}{_sequences(cfg)}, algo.K_epochs {a.K_epochs}\n"
          f"training:   {steps}", flush=True)


def _sequences(cfg: DictConfig) -> str:
    """A recurrent policy's minibatches are whole sequences: of how many steps."""
    if cfg.network.recurrent is None:
        return ""
    seq = cfg.algo.seq_len or cfg.algo.n_steps
    return f" in sequences of {seq:,} steps ({'algo.seq_len' if cfg.algo.seq_len else 'whole rollouts'})"


def _network_text(n: DictConfig) -> str:
    recurrent = f" + {choice(n.recurrent)} {n.rnn_hidden}" if n.recurrent is not None else ""
    return (f"{choice(n.type)} {list(n.net_arch)}{recurrent}, "
            f"{'one trunk for' if n.shared_trunk else 'separate'} actor and critic")


def _env_text(cfg: DictConfig) -> str:
    """The env as the banner names it: the preset chosen (env=...) where it is not the id, the id or entry point,
    and the wrappers env.wrappers puts around it (CartPoleNoVel-v1 is CartPole-v1 + KeepObservationIndices)."""
    wrappers = OmegaConf.to_container(cfg.env.wrappers) if cfg.env.get("wrappers") else []
    names = [str(w.get("_target_", "?")).rpartition(".")[2] for w in wrappers if isinstance(w, dict)]  # type: ignore[union-attr]
    text = str(env_label(cfg.env)) + "".join(f" + {n}" for n in names)
    # The preset only where chosen on the command line: the default's name is wrong once env.id names another env.
    chosen = HydraConfig.initialized() and not cfg.resume and any(
        item.split("=", 1)[0].lstrip("+~") == "env" for item in HydraConfig.get().overrides.task)
    preset = HydraConfig.get().runtime.choices.get("env") if chosen else None
    return f"{preset} ({text})" if preset and preset != text else text


def report(result: TrainResult, run_dir: Path, cfg: DictConfig, extra: dict | None = None) -> float:
    """Print how the run went and write its result.json (with `extra`'s fields); its objective."""
    ev = result.final_eval
    m, s = divmod(int(result.wall_time), 60)
    print(f"done: {result.global_step:,} steps in {m}m{s:02d}s of training ({result.sps:,.0f} SPS)"
          + (f", plus {result.eval_seconds:.1f} s evaluating" if result.eval_seconds else ""))
    if result.stopped_at:
        step, secs = result.stopped_at
        why = "the study's pruner pruned this trial" if result.pruned else "eval.stop_at_return reached"
        print(f"stopped early: {why} at step {step:,} after {secs:.1f} s of training")
    if result.best_eval:
        b = result.best_eval
        print(f"best evaluation: {b['mean_return']:.2f} +/- {b['std_return']:.2f} at step {b['global_step']:,} "
              f"(checkpoints/best.pt)")
    if ev is not None:
        print(f"final evaluation ({len(ev.returns)} episodes): {ev.mean_return:.2f} +/- {ev.std_return:.2f}")
    print(f"run dir:    {run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    # The user's own env code: ppo-eval asks for their word again (envs/recipe.py), so the hint carries it.
    trust = " --trust-env-code" if recipe.code_in_recipe(OmegaConf.to_container(cfg.env)) else ""
    print(f"evaluate:   ppo-eval {result.checkpoint}{trust}")
    write_result(run_dir, {
        "status": "pruned" if result.pruned else "ok",
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
        "warnings": result.warnings,
        **(extra or {}),
    })
    if cfg.get("logger") is not None:
        from ppo_cli.run import trackers  # torch: imported once a run ran

        trackers.add_result(cfg.logger, run_dir, print)
    if result.warnings:
        print(f"doctor:     {len(result.warnings)} warning{'s' if len(result.warnings) > 1 else ''} "
              f"({', '.join(w['symptom'] for w in result.warnings)}), in result.json")
    return result.objective


def write_result(run_dir: Path, fields: dict) -> None:
    """result.json: what ppo-sweep-report reads. Written whole to a temp file and renamed, so a reader of a
    sweep still in progress never sees half a file."""
    hydra_cfg = HydraConfig.get()
    payload = {**fields, "overrides": list(hydra_cfg.overrides.task), "job": hydra_cfg.job.get("num")}
    tmp = run_dir / "result.json.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, run_dir / "result.json")
    except OSError as exc:
        raise UserError(f"cannot write {run_dir / 'result.json'} ({reason(exc)})") from None


def failed(run_dir: Path, reason: str, started: float, extra: dict | None = None) -> None:
    """Record a failed sweep job. It returns None, not NaN: the Optuna sweeper (with optuna 2.x) crashes on a
    NaN objective, while None makes it record the trial as failed; the grid sweeper ignores what jobs return."""
    write_result(run_dir, {"status": "failed", "error": reason, "objective": None,
                            "wall_time": time.perf_counter() - started, **(extra or {})})


def sweep_summary(sweep_dir: Path) -> bool:
    """Print how the sweep went; True when jobs ran and every one failed (none finished, none was pruned)."""
    try:
        jobs = sweep_report.find_jobs(sweep_dir, quiet=True)
    except UserError:
        jobs = []
    ok = [j for j in jobs if j.status == "ok"]
    pruned = sum(j.status == "pruned" for j in jobs)
    failed = len(jobs) - len(ok) - pruned
    line = f"sweep: {len(jobs)} jobs, {len(ok)} done, " + (f"{pruned} pruned, " if pruned else "") + f"{failed} failed"
    if ok:
        best = max(ok, key=lambda j: j.objective)  # type: ignore[arg-type, return-value]
        line += f"; best objective {best.objective:.2f} (job {best.name})"
    print(line, flush=True)
    print(f"report:     ppo-sweep-report {sweep_dir}", flush=True)
    return bool(jobs) and not ok and not pruned
