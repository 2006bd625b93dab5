"""Where numbers go: TensorBoard event files in the run directory, and the console.

On a terminal the console shows a rich progress bar (steps, SPS, recent mean return, ETA); otherwise
(a pipe, a file, CI, a Slurm log) it prints one plain line every `log_interval` updates.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary

from ppo_cli.errors import UserError
from ppo_cli.run import trackers

_thread_hook: Callable[[Any], None] | None = None


def _quiet_writer_thread_errors() -> None:
    """TensorBoard writes event files from a thread; a failed write (full disk, folder gone) would print that
    thread's traceback. The writer raises the same error in the training thread at its next call, where it
    becomes one line (Logger._writing), so the thread stays quiet about OSErrors."""
    global _thread_hook
    if _thread_hook is not None:
        return
    _thread_hook = threading.excepthook

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        _thread_hook(args)  # type: ignore[misc]

    threading.excepthook = hook


def _fmt_duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


LIVE_SECONDS = 10.0  # a plain console's longest silence while a rollout runs


class Logger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int, config_yaml: str,
                 log_interval: int = 1, purge_step: int | None = None, rich_progress: bool | None = None,
                 cfg: Any = None, label: str = "") -> None:
        _quiet_writer_thread_errors()
        self.prefix = f"[{label}] " if label else ""  # a batch's member: which one a console line is about
        self.run_dir = Path(run_dir)
        self.failed = False
        with self._writing():
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)
            if purge_step is None:
                self.writer.add_text("config", "```yaml\n" + config_yaml + "\n```", 0)
        self.total, self.start_step = total_steps, start_step
        self.log_interval = log_interval
        self.progress: Any = None
        # W&B / MLflow beside TensorBoard (trackers.py), where logger.backends names them.
        self.tracking = None if cfg is None else cfg.get("logger")
        self.trackers = [] if self.tracking is None else trackers.open_trackers(
            self.tracking, self.run_dir, cfg, purge_step, self.message)
        use_rich = sys.stdout.isatty() if rich_progress is None else rich_progress
        self.started = self.last_line = self.update_began = time.perf_counter()
        if use_rich:  # imported only here: a run without a terminal (sweeps, CI) does not pay for it
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]ppo-train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=Console(stderr=False))
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed event-file write becomes one UserError naming the folder and the reason."""
        try:
            yield
        except OSError as exc:
            self.failed = True
            raise UserError(f"cannot write TensorBoard events into {self.run_dir} "
                            f"({exc.strerror or str(exc) or type(exc).__name__})") from None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with self._writing():
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        self._track(lambda t: t.scalars(step, values))

    def _track(self, what: Any) -> None:
        if self.trackers:
            self.trackers = trackers.call(self.trackers, what, bool(self.tracking.strict), self.message)

    def hparams(self, params: dict[str, float | int | str | bool], metrics: dict[str, float], step: int) -> None:
        """The run's hyperparameters and results for TensorBoard's HPARAMS tab, which lines up the jobs of a
        sweep (`tensorboard --logdir runs/multirun/...`). Written into this run's own event file, unlike
        SummaryWriter.add_hparams, which would open a new sub-run for it."""
        with self._writing():
            for summary in hparams_summary(params, metrics):
                self.writer._get_file_writer().add_summary(summary)
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)
        self._track(lambda t: t.scalars(step, metrics))

    def update_done(self, update: int, step: int, sps: float, mean_return: float | None) -> None:
        ret = "n/a" if mean_return is None else f"{mean_return:.1f}"
        self.update_began = time.perf_counter()
        if self.progress is not None:
            self.progress.update(self.task, completed=min(step, self.total),
                                 info=f"SPS {sps:,.0f} | return {ret}")
        elif update % self.log_interval == 0:
            done = max(step - self.start_step, 1)
            eta = (time.perf_counter() - self.started) * max(self.total - step, 0) / done
            print(f"{self.prefix}step {step:>9,}/{self.total:,} | update {update} | SPS {sps:,.0f} | "
                  f"mean return {ret} | ETA {_fmt_duration(eta)}", flush=True)
            self.last_line = time.perf_counter()

    def live(self, step: int, updates_done: int, phase: str) -> None:
        """Progress inside an update (another thread calls this about once a second; `phase`: the runner's, rollout,
        update or evaluation): the bar moves; a plain console gets a line where none came for LIVE_SECONDS, so a
        slow first update is not silent."""
        doing = {"rollout": "collecting", "update": "learning", "evaluation": "evaluating"}.get(phase, phase)
        update = updates_done + (phase != "evaluation")  # an evaluation follows the update it evaluates
        if self.progress is not None:
            self.progress.update(self.task, completed=min(step, self.total))
            return
        now = time.perf_counter()
        if now - self.last_line < LIVE_SECONDS:
            return
        # One write to the file descriptor: whole lines between the main thread's, and no Python stream lock held
        # by this thread when an async env forks its workers.
        line = (f"step {step:>9,}/{self.total:,} | update {update} {doing} | "
                f"{_fmt_duration(now - self.update_began)} into it\n")
        try:
            os.write(sys.stdout.fileno(), line.encode())
        except (OSError, ValueError):  # no file descriptor behind stdout (a captured stream): skip the line
            return
        self.last_line = now

    def warnings(self, found: list[Any]) -> None:
        """The training doctor's new warnings (run/doctor.py): on the console, and as TensorBoard text."""
        for warning in found:
            self.message(f"warning: {warning.message}")
            with self._writing():
                self.writer.add_text(f"doctor/{warning.symptom}", warning.message, warning.step)
            self._track(lambda t, w=warning: t.text(f"doctor/{w.symptom}", w.message, w.step))

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(self.prefix + text, flush=True)
            self.last_line = time.perf_counter()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.trackers:
            # Closing reports how the run ended (a failure or a stop in progress: FAILED), and a tracker that fails
            # now is a warning line whatever logger.strict says: the run's outcome is not the tracker's to change.
            failed = sys.exc_info()[0] is not None
            saved = [p for p in (self.run_dir / "checkpoints" / n for n in ("checkpoint.pt", "best.pt"))
                     if p.is_file()]
            trackers.save_ids(self.run_dir, self.trackers)
            trackers.call(self.trackers, lambda t: t.close(saved, failed), False, self.message)
            self.trackers = []
        if self.failed:  # already reported; closing would only raise the same error again
            try:
                self.writer.close()
            except OSError:
                pass
            return
        with self._writing():
            self.writer.flush()
            self.writer.close()


class QuietLogger:
    """The logger of a distributed run's ranks other than 0: they log nothing (rank 0 speaks for the run)."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def hparams(self, params: dict[str, float | int | str | bool], metrics: dict[str, float], step: int) -> None:
        pass

    def update_done(self, update: int, step: int, sps: float, mean_return: float | None) -> None:
        pass

    def live(self, step: int, updates_done: int, phase: str) -> None:
        pass

    def warnings(self, found: list[Any]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

