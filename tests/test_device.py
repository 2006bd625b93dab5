"""device=auto's choice (with and without a GPU); device=cuda end to end: rollout and update on the GPU,
checkpoints that load on the CPU (needs a GPU)."""

import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from ppo_cli import devices
from ppo_cli.algo.rollout import TorchActor
from ppo_cli.cli.evaluate import load_policy
from ppo_cli.devices import choose_device, precision_text, torch_threads
from ppo_cli.envs.make import make_vec_env
from ppo_cli.errors import UserError
from ppo_cli.policy.actor_critic import settle_network
from ppo_cli.run import checkpoint
from ppo_cli.run.evaluation import evaluate
from ppo_cli.run.runner import Runner

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
    settle_network(cfg)  # network=auto: as a run decides it before choosing the device
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
    auto = precision_text(make_cfg("network=cnn", "network.precision=auto"), cpu)
    assert auto == ("; encoder in bfloat16 (network.precision=auto: this CPU computes bfloat16 natively)" if native
                    else "; encoder in float32 (network.precision=auto: this CPU has no native bfloat16)")
    assert precision_text(make_cfg("network.precision=auto"), cpu) == ""  # an MLP has no choice to report


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bfloat16_for_image_encoders_where_the_device_computes_it_natively(native, monkeypatch):
    from ppo_cli.policy.actor_critic import build_policy

    monkeypatch.setattr(devices, "native_bfloat16", lambda device: native)
    image = {"type": "Box", "shape": [4, 84, 84], "dtype": "uint8", "low": 0, "high": 255}
    act = {"type": "Discrete", "n": 4, "start": 0}
    policy = build_policy(image, act, make_cfg("network=cnn", "network.precision=auto"))
    assert policy.actor_encoder.compute_dtype is (torch.bfloat16 if native else None)
    assert build_policy(image, act, make_cfg("network=cnn")).actor_encoder.compute_dtype is None  # float32 default
    assert devices.resolve_precision("auto", "mlp", torch.device("cpu")) == "float32"
    assert devices.resolve_precision("bfloat16", "cnn", torch.device("cpu")) == "bfloat16"  # asked: as asked


def test_torch_threads_auto_is_one_for_mlps_and_the_cores_for_image_encoders(monkeypatch):
    monkeypatch.setattr(devices, "DEFAULT_THREADS", 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert torch_threads(make_cfg()) == 1
    assert torch_threads(make_cfg("network=cnn")) == torch_threads(make_cfg("network=impala")) == 8
    assert torch_threads(make_cfg("network=cnn", "torch_threads=3")) == 3  # a set value is kept
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's processes on this machine share the cores
    assert torch_threads(make_cfg("network=cnn")) == 2 and torch_threads(make_cfg()) == 1


# Blocks of 10 to 30 MB, each a little larger than the last, as a CNN's activations grow with the minibatch: by
# default glibc maps each one on its own (its threshold follows the largest block freed), so each is paged in anew.
PAGE_FAULTS = """
import resource, sys, torch
from ppo_cli.devices import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mb in range(10, 31):
    torch.empty(mb << 20, dtype=torch.uint8).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_cpu_runs_keep_freed_memory_instead_of_paging_it_in_every_step(monkeypatch):
    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], env={"PATH": ""},
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    pages = sum(range(10, 31)) << 8  # 4 KB pages in all the blocks: 107,520
    kept, default = faults("keep"), faults("default")
    assert default > 0.9 * pages  # the premise: every block paged in
    assert kept < 0.2 * pages  # the heap grows to the largest block once and keeps it
    for name, value in (("LD_PRELOAD", "libjemalloc.so"), ("MALLOC_TRIM_THRESHOLD_", "131072")):
        with monkeypatch.context() as m:  # the user's allocator, or their own thresholds, are left alone
            m.setenv(name, value)
            assert not devices.keep_freed_memory()


@needs_cuda
@pytest.mark.parametrize("env", ["env=CartPole-v1", "env=Pendulum-v1"])
def test_cuda_training_and_cpu_loading(env, tmp_path):
    cfg = make_cfg(*TINY, env, "device=cuda", "eval.every_steps=128")
    trainer = Runner(cfg, tmp_path / "run", rich_progress=False)
    try:
        assert isinstance(trainer.algo.actor, TorchActor)  # the numpy rollout is CPU-only
        result = trainer.run()
        assert all(p.device.type == "cuda" for p in trainer.algo.policy.parameters())
        assert trainer.algo.buffer.obs.device.type == "cuda"
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


# --- the GPU rollout's transfers (devices.HostStaging, staged RolloutBuffer and TorchActor), run on the CPU ---------
def _staged(trainer: Runner) -> Runner:
    """The trainer's torch actor and buffer swapped for staged ones, as a GPU run builds them."""
    from ppo_cli.algo.storage import RolloutBuffer

    old, a = trainer.algo.buffer, trainer.cfg.algo
    trainer.algo.buffer = RolloutBuffer(a.n_steps, old.num_envs, tuple(old.obs.shape[2:]), old.obs.dtype,
                                   tuple(old.actions.shape[2:]), old.actions.dtype, trainer.device,
                                   None if old.masks is None else old.masks.shape[-1], trainer.algo.policy.state_size,
                                   staged=True)
    trainer.algo.actor = TorchActor(trainer.algo.policy, trainer.algo.np_rng, trainer.device, old.num_envs, staged=True)
    return trainer


@pytest.mark.parametrize(("overrides", "truncations"), [
    (["env.max_episode_steps=20"], True),  # terminations and time-limit truncations (bootstrapped from final obs)
    (["env=MaskedGrid-v0", "env.max_episode_steps=12"], True),  # action masks
    (["env=GoalReach-v0", "env.normalize_obs=true"], False),  # a Dict observation, normalized
    (["env=CartPoleNoVel-v1", "algo=ppo_lstm", "algo.n_steps=32", "algo.batch_size=64", "algo.K_epochs=2",
      "env.max_episode_steps=25"], True),  # a recurrent policy: episode starts, state zeroed at ends
    (["env.entry_point=tests.test_pixels:LitCell", "+env.kwargs.mirror=true", "network=cnn", "algo.n_steps=16",
      "algo.batch_size=16", "algo.total_timesteps=64"], False),  # uint8 images beside a vector, with the CNN
])
def test_a_staged_rollout_trains_exactly_as_the_plain_one(overrides, truncations, tmp_path):
    """A GPU run stages each step's copies and writes the envs' side of the rollout on the host, copied over once
    per rollout; on the CPU the same code must give the plain rollout's buffer and parameters bit for bit."""
    cfg = make_cfg(*TINY, *overrides, "fast_rollout=false", "checkpoint_interval=0", "eval.final=false",
                   "eval.objective=train", "device=cpu")
    runs = []
    for name, staged in (("plain", False), ("staged", True)):
        trainer = Runner(cfg, tmp_path / name, rich_progress=False)
        if staged:
            _staged(trainer)
        assert trainer.algo.buffer.staged is staged and (trainer.algo.actor.staging is not None) is staged
        try:
            trainer.run()
        finally:
            trainer.close()
        runs.append(trainer)
    plain, staged_run = runs
    for field in ("obs", "actions", "logp", "values", "rewards", "terminated", "episode_end", "final_values",
                  "masks", "starts"):
        a, b = getattr(plain.algo.buffer, field), getattr(staged_run.algo.buffer, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    if truncations:  # the last rollout bootstrapped truncated episodes from their final observations
        assert (plain.algo.buffer.final_values != 0).any()
    for p, q in zip(plain.algo.policy.parameters(), staged_run.algo.policy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_host_staging_copies_and_never_aliases_its_buffers():
    staging = devices.HostStaging(torch.device("cpu"))
    obs = np.arange(6, dtype=np.float32).reshape(2, 3)
    first = staging.to_device("obs", obs)
    second = staging.to_device("obs", obs + 1)  # the same buffer, refilled: the first tensor must not change
    assert torch.equal(first, torch.from_numpy(obs)) and torch.equal(second, torch.from_numpy(obs + 1))
    parts = staging.tensors({"a": obs, "b": np.ones(2, dtype=bool)})
    assert parts["b"].dtype == torch.bool and torch.equal(parts["a"], first)
    back = staging.to_host("action", torch.tensor([1, 2]))
    again = staging.to_host("action", torch.tensor([3, 4]))
    assert back.tolist() == [1, 2] and again.tolist() == [3, 4]


@needs_cuda
def test_cuda_update_equals_the_cpu_autograd_update_on_the_same_batch():
    """The CUDA path's update (autograd on the GPU, fused Adam, the shuffles' generator moved along) against the
    CPU autograd update, on one batch and one permutation stream: parameters agree to float tolerance."""
    from ppo_cli.algo.storage import Batch
    from ppo_cli.algo.update import Updater, UpdateSettings, make_optimizer
    from ppo_cli.policy.actor_critic import build_policy

    cfg = make_cfg("network.net_arch=[64,64]")
    obs_space = {"type": "Box", "shape": [4], "dtype": "float32"}
    act_space = {"type": "Discrete", "n": 2, "start": 0}
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        policy = build_policy(obs_space, act_space, cfg).to(device)
        opt = make_optimizer(policy, "adam", 3e-4, 3e-4, 1e-5, 0.0)
        g = torch.Generator(device="cpu").manual_seed(0)
        n = 512
        data = torch.Generator().manual_seed(1)
        batch = Batch(torch.randn(n, 4, generator=data), torch.randint(0, 2, (n, 1), generator=data),
                      -torch.rand(n, generator=data), torch.randn(n, generator=data), torch.randn(n, generator=data),
                      torch.randn(n, generator=data))
        batch = Batch(*(t.to(device) for t in (batch.obs, batch.actions, batch.logp, batch.values,
                                               batch.advantages, batch.returns)))
        updater, _ = Updater.build(policy, opt, g, fast_update=False)
        updater._permutation = lambda b, g=g: torch.randperm(len(b), generator=g).to(b.obs.device)
        stats = updater.update(batch, UpdateSettings(0.1, None, 0.01, 0.5, 0.5, 3, 64, True, None))
        results.append(([p.detach().cpu() for p in policy.parameters()], stats))
    (cpu_params, cpu_stats), (gpu_params, gpu_stats) = results
    for a, b in zip(cpu_params, gpu_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for key in cpu_stats:
        assert cpu_stats[key] == pytest.approx(gpu_stats[key], rel=1e-3, abs=1e-5), key
