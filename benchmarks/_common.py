"""What the benchmark scripts share: a ppo-cli run from overrides, in this process, quietly."""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_ppo_cli(overrides: list[str]) -> Any:
    """Train with these overrides (plus no periodic checkpoints, CPU, one thread) and return the TrainResult."""
    from hydra import compose, initialize_config_module

    from ppo_cli.config import register_configs
    from ppo_cli.trainer import Trainer

    register_configs()
    with initialize_config_module("ppo_cli.conf", version_base="1.3"):
        cfg = compose("config", overrides=["checkpoint_interval=0", "device=cpu", "torch_threads=1", *overrides])
    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, Path(d), rich_progress=False)
        with contextlib.redirect_stdout(io.StringIO()):
            result = trainer.run()
        trainer.close()
    return result
