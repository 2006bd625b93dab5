"""Several runs trained in one process as one batch (`hydra/launcher=ppo_batched`): one vector env of all their
envs, one batched rollout and update (algo/batched.py), and for each member a Runner of its own (its folder,
TensorBoard, console lines, evaluations, checkpoints, result) that records what the batch computed for it.

A member that diverges stops alone (its result is the error); a stop signal saves every member still training at
the same update boundary.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ppo_cli.algo.batched import BatchedPPO, refusal
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.distributed import Ranks
from ppo_cli.envs.faults import EnvFault, close_at_once, count_steps, kill_workers
from ppo_cli.envs.make import make_vec_env
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import settle_network
from ppo_cli.run.evaluation import EVAL_SEED_OFFSET, run_episodes
from ppo_cli.run.runner import STAGES, Diverged, Member, Runner, TrainResult, nonfinite
from ppo_cli.run.signals import (
    EvaluationStopped,
    Interrupted,
    StopSignals,
    held_from_workers,
    notice,
    say,
    stop_signals,
)
from ppo_cli.run.stalls import Stalls

Outcome = TrainResult | UserError | Interrupted


class NotBatchable(Exception):
    """These runs cannot be trained as one batch (the reason); the launcher trains them one after another."""


class BatchedRunner:
    """The members' runs, `jobs` (config, run folder), trained together; `resume`: each one's checkpoint state to
    resume from, or None. Their configs differ at most in algo.batched.MEMBER_KEYS (the launcher groups them so).
    A resumed member starts its episodes anew (its envs are the batch's), its envs seeded as its run resumed alone
    would seed them."""

    def __init__(self, jobs: list[tuple[DictConfig, Path]], resume: list[dict | None] | None = None) -> None:
        cfgs = [cfg for cfg, _ in jobs]
        for cfg in cfgs:
            settle_network(cfg)
        first = cfgs[0]
        if first.env.get("backend", "gymnasium") != "gymnasium":
            raise NotBatchable("a batch steps its members' envs as one gymnasium vector env (env.backend=gymnasium)")
        each = first.env.num_envs
        # Member k's envs are seeded as its single run seeds its own: seed, seed + 1, ...
        self.seeds = [int(cfg.seed) + i for cfg in cfgs for i in range(each)]
        self.clock = Stopwatch(STAGES)
        self.stops = StopSignals(Ranks(), self._notice, self._stop_at_once)
        self.runners: list[Runner] = []
        self.outcomes: list[Outcome | None] = [None] * len(jobs)  # each member's, as it is decided
        self._eval: tuple[list[int], Any] | None = None  # the members evaluated together last, and their envs
        # Async workers must not see a Ctrl-C (run/signals.py): the batch stops at its next boundary instead.
        with held_from_workers(self.stops.remember) if first.env.vectorization == "async" else nullcontext():
            self.envs = make_vec_env(first.env, seed=self.seeds, num_envs=len(cfgs) * each, training=True,
                                     block=each)
        self.stalls = Stalls(lambda: (self.envs,))
        try:
            obs, info = self.envs.reset(seed=self.seeds)
            for k, (cfg, run_dir) in enumerate(jobs):
                member = Member(self.envs, obs, info, self.clock, self.stops, f"{k}: {run_dir.name}")
                self.runners.append(Runner(cfg, run_dir, None if resume is None else resume[k], member=member))
            why = refusal(self.runners[0].algo)
            if why:
                raise NotBatchable(why)
            if any(r.global_step for r in self.runners):  # as Runner._restore reseeds a run's envs on a resume
                self.seeds = [int(r.cfg.seed) + r.global_step + i for r in self.runners for i in range(each)]
                obs, info = self.envs.reset(seed=self.seeds)
            self.algo = BatchedPPO([r.algo for r in self.runners], obs, self.clock)
            # Env faults name the step as the members count theirs (they all step together).
            count_steps(self.envs, self.runners[0].global_step, stride=each)
            for r in self.runners:
                r.open_logger(resumed=r.global_step > 0)
        except BaseException:
            self.close()
            raise

    def run(self) -> list[Outcome]:
        """Train every member to its algo.total_timesteps; each member's result, or the error that stopped it
        (Diverged, an env fault), or the Interrupted of a stop signal (every member still training saved at one
        boundary). `outcomes` holds each as it is decided, for a caller that sees this raise."""
        outcomes, stops = self.outcomes, self.stops
        for r in self.runners:
            for note in r.notes:
                r.logger.message(note)
        try:
            with stop_signals(stops.handle):
                while (active := np.array([o is None for o in outcomes])).any():
                    training = [self.runners[k] for k in np.flatnonzero(active)]
                    if stops.agreed():
                        self._interrupted(active, None)
                        break
                    step0, time0 = [r.global_step for r in self.runners], self.clock.total()
                    starts = {id(r): r._boundary() for r in training}
                    stops.phase = "rollout"
                    try:
                        rollouts = self.algo.collect(self.envs, stops.requested, active)
                    except EnvFault as exc:  # every member still training is saved where the rollout began
                        self._env_fault(exc, active, starts)
                        break
                    if stops.requested():  # the rollout is dropped; every member saved where it started
                        self._interrupted(active, starts)
                        break
                    stops.phase = "update"
                    progress = [r.global_step / r.cfg.algo.total_timesteps for r in self.runners]
                    scalars = self.algo.learn(progress, active)
                    finite = [k for k in np.flatnonzero(active) if not nonfinite(scalars[k])]  # not diverged
                    self._evaluate_together(finite, step0, rollouts)
                    for k in np.flatnonzero(active):
                        outcomes[k] = self._record(self.runners[k], step0[k], time0, rollouts[k], scalars[k])
        finally:
            for r in self.runners:
                r.logger.close()
        return outcomes  # type: ignore[return-value]

    def _evaluate_together(self, members: list[int], step0: list[int], rollouts: list[Any]) -> None:
        """The periodic and final evaluations the members are due after this update, played together: their
        evaluation envs as one vector env (each member's seeded as its run seeds its own), their policies in one
        stacked pass. Each member's evaluator takes its share (PeriodicEvaluator.take) and plays none of its own.
        Stochastic evaluations (eval.deterministic=false) draw from each run's own stream: each member plays its own."""
        due, after = [], {}
        for k in members:
            r = self.runners[k]
            after[k] = step0[k] + rollouts[k].steps
            ends = after[k] >= r.cfg.algo.total_timesteps and r.cfg.eval.final
            if r.evaluator.due(step0[k], after[k]) or ends:
                due.append(int(k))
        first = self.runners[due[0]].cfg if due else None
        if first is None or not first.eval.deterministic or self.stops.requested():
            return
        each = min(first.eval.episodes, first.env.num_envs)
        seeds = [int(self.runners[k].cfg.seed) + EVAL_SEED_OFFSET + i for k in due for i in range(each)]
        started = time.perf_counter()
        if self._eval is None or self._eval[0] != due:
            self._close_evaluation()
            self._eval = (due, make_vec_env(first.env, seed=seeds, num_envs=len(seeds),
                                            step_cap=first.eval.max_episode_steps, block=each))
        actor = self.algo.evaluation_actor(due)
        envs = self._eval[1]
        try:
            with self.stops.evaluation():
                result = run_episodes(envs, lambda obs, _mask, _starts: actor.env_action(actor.mode(
                    actor.inputs(obs, False))), first.eval.episodes, seeds, blocks=len(due))
        except EvaluationStopped:  # the members skip their evaluations: a stop was asked for
            close_at_once(envs)
            self._eval = None
            return
        seconds = (time.perf_counter() - started) / len(due)
        for j, k in enumerate(due):
            self.runners[k].evaluator.take(after[k], result.part(j * each, each), seconds)

    def _close_evaluation(self) -> None:
        if self._eval is not None:
            self._eval[1].close()
            self._eval = None

    def _record(self, r: Runner, step0: int, time0: float, rollout: Any,
                scalars: dict[str, float] | None) -> Outcome | None:
        """The member's update recorded; its outcome where it is done, else None."""
        try:
            stopped = r.record(step0, time0, rollout, scalars)  # type: ignore[arg-type]
        except Diverged as exc:  # this member alone: the others go on
            r.logger.message(f"ppo-train: error: {exc}")
            return exc
        if not (stopped or r.global_step >= r.cfg.algo.total_timesteps):
            return None
        path = r.save()
        if self.stops.agreed():  # asked during the last update: the member is trained, its evaluation waits
            return Interrupted(self.stops.signal or signal.SIGTERM, r.global_step, path)
        try:
            return r.conclude(path, (r.global_step, r.wall_time) if stopped else None)
        except Interrupted as exc:  # a stop in its final evaluation: the others are saved at the next boundary
            return exc

    def _interrupted(self, active: np.ndarray, starts: dict | None) -> None:
        signum = self.stops.signal or signal.SIGTERM
        for k in np.flatnonzero(active):
            r = self.runners[k]
            self.outcomes[k] = Interrupted(signum, r.global_step, r.save(at=None if starts is None else starts[id(r)]))

    def _env_fault(self, exc: EnvFault, active: np.ndarray, starts: dict) -> None:
        for k in np.flatnonzero(active):
            r = self.runners[k]
            if r.update_idx == r._first_update:  # nothing trained yet: nothing to save
                self.outcomes[k] = exc
                continue
            path = r.save(at=starts[id(r)])
            self.outcomes[k] = EnvFault(f"{exc}; the run until step {r.global_step:,} is saved: "
                                        f"ppo-train resume={path} continues")

    # --- signals ----------------------------------------------------------------------------------------
    def _notice(self, signum: int) -> str:
        r = self.runners[0] if self.runners else None
        step = 0 if r is None else r.global_step
        seconds = self.clock.seconds["advantages"] + self.clock.seconds["update"]
        updates = 0 if r is None else r.update_idx - r._first_update
        return notice(signum, self.stops.phase, False, step, updates, seconds) + " (every member of the batch)"

    def _stop_at_once(self, signum: int) -> None:
        say(f"ppo-train: stopped at once by a second {signal.Signals(signum).name}; each member's last checkpoint "
            f"is kept")
        kill_workers(self.envs)
        if self._eval is not None:
            kill_workers(self._eval[1])
        for r in self.runners:
            kill_workers(r.evaluator.envs)
        os._exit(128 + signum)

    def close(self) -> None:
        self._close_evaluation()
        for r in self.runners:
            r.logger.close()
            r.close()
        self.stalls.close()
        self.envs.close()
