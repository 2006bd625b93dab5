"""ppo-cli's Hydra sweepers: hydra/sweeper=ppo_tune (Optuna search with pruning) and hydra/sweeper=ppo_pbt
(population-based training); and its launcher, hydra/launcher=ppo_batched (many runs in one process). Hydra finds
plugins only in the hydra_plugins namespace and imports every module there at each start, so this module stays
light: the work is in ppo_cli.cli.tune, ppo_cli.cli.pbt and ppo_cli.cli.batch_launch, imported when a sweep
starts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class _PPOSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)


class PPOTuneSweeper(_PPOSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from ppo_cli.cli.tune import Tuner

        assert self.config is not None
        tuner = Tuner(self.settings, self.config, self.launcher)
        tuner.validate = self.validate_batch_is_legal
        return tuner.sweep(arguments)


class PPOPBTSweeper(_PPOSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        from ppo_cli.cli.pbt import PopulationTraining

        assert self.config is not None
        return PopulationTraining(self.settings, self.config, self.launcher).sweep(arguments)


class PPOBatchedLauncher(Launcher):
    """hydra/launcher=ppo_batched: the jobs of a sweep trained as batches in this process (ppo_cli.cli.batch_launch)."""

    def __init__(self, **settings: Any) -> None:
        self.settings = settings
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from ppo_cli.cli.batch_launch import launch

        assert self.config is not None
        return launch(self.hydra_context, self.config, job_overrides, initial_job_idx, self.settings)
