"""Evaluation during training: eval/* tags, best.pt, and no effect on what training computes."""

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_cli.run import checkpoint
from ppo_cli.run.runner import Runner

from .conftest import TINY, cli, make_cfg

SMALL = ["env.num_envs=2", "algo.n_steps=64", "algo.batch_size=32", "algo.total_timesteps=1024",
         "eval.episodes=3", "eval.final=false", "eval.objective=train", "checkpoint_interval=0"]


def test_eval_tags_and_best_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("ppo-train", *TINY, "algo.total_timesteps=1024", "eval.every_steps=256", "eval.episodes=3",
               f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True)
    assert "eval @ 256: mean return" in proc.stdout
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("eval/mean_return", "eval/std_return", "eval/mean_length", "charts/eval_seconds"):
        assert tag in acc.Tags()["scalars"], tag
    evals = acc.Scalars("eval/mean_return")
    assert [e.step for e in evals] == [256, 512, 768, 1024]
    best = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    top = max(evals, key=lambda e: e.value)
    assert abs(best["eval"]["mean_return"] - top.value) < 1e-4
    assert best["eval"]["global_step"] == best["global_step"] == min(e.step for e in evals if e.value == top.value)


def _params(*overrides, tmp):
    trainer = Runner(make_cfg(*SMALL, *overrides), tmp, rich_progress=False)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer.algo.policy.state_dict(), trainer.evaluator.seconds


def test_evaluation_does_not_change_training(tmp_path):
    with_eval, seconds = _params("eval.every_steps=128", tmp=tmp_path / "a")
    without, none = _params("eval.every_steps=0", tmp=tmp_path / "b")
    assert seconds > 0 and none == 0
    for name, value in with_eval.items():
        assert torch.equal(value, without[name]), name


def test_stochastic_evaluation_option(tmp_path):
    cfg = make_cfg(*SMALL, "eval.every_steps=512", "eval.deterministic=false")
    trainer = Runner(cfg, tmp_path, rich_progress=False)
    try:
        result = trainer.run()
    finally:
        trainer.close()
    assert result.best_eval is not None and result.best_eval["episodes"] == 3
