"""device=cuda end to end: rollout and update on the GPU, checkpoints that load on the CPU. Needs a GPU."""

import pytest
import torch

from ppo_cli import checkpoint
from ppo_cli.cli.evaluate import load_policy
from ppo_cli.envs import make_vec_env
from ppo_cli.evaluation import evaluate
from ppo_cli.trainer import Trainer

from .conftest import TINY, make_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.parametrize("env", ["env=CartPole-v1", "env=Pendulum-v1"])
def test_cuda_training_and_cpu_loading(env, tmp_path):
    cfg = make_cfg(*TINY, env, "device=cuda", "eval.every_steps=128")
    trainer = Trainer(cfg, tmp_path / "run", rich_progress=False)
    try:
        assert trainer.numpy_actor is None  # the numpy rollout is CPU-only
        result = trainer.run()
        assert all(p.device.type == "cuda" for p in trainer.policy.parameters())
        assert trainer.buffer.obs.device.type == "cuda"
    finally:
        trainer.close()
    data = checkpoint.load(result.checkpoint)  # maps to CPU
    policy, run_cfg = load_policy(data)
    assert all(p.device.type == "cpu" for p in policy.parameters())
    envs = make_vec_env(run_cfg.env, seed=0, num_envs=2)
    try:
        assert len(evaluate(policy, envs, episodes=2, seed=0).returns) == 2
    finally:
        envs.close()
