"""device=auto's choice (with and without a GPU); device=cuda end to end: rollout and update on the GPU,
checkpoints that load on the CPU (needs a GPU)."""

import pytest
import torch

from ppo_cli import checkpoint, devices
from ppo_cli.cli.evaluate import load_policy
from ppo_cli.devices import choose_device, precision_text, torch_threads
from ppo_cli.envs import make_vec_env
from ppo_cli.errors import UserError
from ppo_cli.evaluation import evaluate
from ppo_cli.rollout import TorchActor
from ppo_cli.trainer import Trainer

from .conftest import TINY, make_cfg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.parametrize(("overrides", "gpu_device"), [
    ([], "cpu"),  # the source defaults: [64, 64], minibatches of 64 (6.3x faster on the CPU, issue 16)
    (["network.net_arch=[256,256]", "algo.batch_size=2048"], "cuda"),
    (["network.net_arch=[512,512]", "algo.batch_size=8192"], "cuda"),
    (["network=cnn", "env=Breakout"], "cuda"),
    (["device=cpu", "network.net_arch=[512,512]", "algo.batch_size=8192"], "cpu"),
])
def test_auto_picks_the_faster_device_and_says_why(overrides, gpu_device, monkeypatch):
    cfg = make_cfg(*overrides)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(cfg).device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    picked = choose_device(cfg)
    assert picked.device.type == gpu_device and picked.reason


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="torch sees no CUDA GPU"):
        choose_device(make_cfg("device=cuda"))


@pytest.mark.parametrize("native", [True, False])
def test_the_banner_says_when_the_encoder_computes_in_bfloat16(native, monkeypatch):
    cpu = torch.device("cpu")
    assert precision_text(make_cfg("network=cnn"), cpu) == ""
    monkeypatch.setattr(devices, "native_bfloat16", lambda device: native)
    text = precision_text(make_cfg("network=cnn", "network.precision=bfloat16"), cpu)
    assert text.startswith("; encoder in bfloat16 (network.precision)")
    assert ("only emulates: slower than float32 here" in text) is not native


def test_torch_threads_auto_is_one_for_mlps_and_the_cores_for_image_encoders(monkeypatch):
    monkeypatch.setattr(devices, "DEFAULT_THREADS", 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert torch_threads(make_cfg()) == 1
    assert torch_threads(make_cfg("network=cnn")) == torch_threads(make_cfg("network=impala")) == 8
    assert torch_threads(make_cfg("network=cnn", "torch_threads=3")) == 3  # a set value is kept
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's processes on this machine share the cores
    assert torch_threads(make_cfg("network=cnn")) == 2 and torch_threads(make_cfg()) == 1


@needs_cuda
@pytest.mark.parametrize("env", ["env=CartPole-v1", "env=Pendulum-v1"])
def test_cuda_training_and_cpu_loading(env, tmp_path):
    cfg = make_cfg(*TINY, env, "device=cuda", "eval.every_steps=128")
    trainer = Trainer(cfg, tmp_path / "run", rich_progress=False)
    try:
        assert isinstance(trainer.actor, TorchActor)  # the numpy rollout is CPU-only
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
