"""Single-observation inference latency: the checkpoint policy in torch against its ppo-export files.

    pip install ".[export]"
    python benchmarks/export_latency.py            # --calls 3000 --threads 1

For each policy below, one observation at a time (a batch of one, as a robot or game server acts), the time of:

- torch: the checkpoint policy as ppo-eval runs it: `prepare` (normalization), `act(deterministic=True)` (which
  also computes the log-prob and the value), `env_action`, under torch.inference_mode;
- torch, minimal: the least the checkpoint policy needs for an action: `prepare`, `forward`, the head's `mode`,
  `env_action`;
- TorchScript: the `--format torchscript` file, `torch.jit.load`ed, called on the observation tensor;
- onnxruntime: the `--format onnx` file in an onnxruntime InferenceSession (CPU), `session.run` on the array.

Each gets the same number of threads (--threads, default 1: a deployment usually runs one policy per core), a
warm-up, then --calls timed calls; the median and 90th percentile are printed, in microseconds. No policy is
trained: latency does not depend on the weights. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
import numpy as np
import torch

from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.export import ExportedModel, export_policy

# (label, observation space, action space, ActorCritic keyword arguments)
POLICIES = [
    ("CartPole MLP [64, 64]", {"type": "Box", "shape": [4]}, {"type": "Discrete", "n": 2},
     {"net_arch": [64, 64]}),
    ("MuJoCo-size MLP [256, 256], obs 17 -> Box 6, normalized", {"type": "Box", "shape": [17]},
     {"type": "Box", "shape": [6], "low": [-1.0] * 6, "high": [1.0] * 6},
     {"net_arch": [256, 256], "normalize_obs": True}),
    ("Atari Nature CNN, uint8 84x84x4 -> Discrete 6", {"type": "Box", "shape": [84, 84, 4], "dtype": "uint8"},
     {"type": "Discrete", "n": 6},
     {"net_arch": [512], "encoder": "cnn", "activation_fn": "relu", "shared_trunk": True}),
]


def _time(fn: Callable[[], object], calls: int) -> tuple[float, float]:
    for _ in range(max(50, calls // 10)):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * len(samples))]


def _observation(space: dict, rng: np.random.Generator) -> np.ndarray:
    if space.get("dtype") == "uint8":
        return rng.integers(0, 256, space["shape"], dtype=np.uint8)
    return rng.standard_normal(space["shape"]).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=3000, help="timed calls per runtime and policy (default: 3000)")
    p.add_argument("--threads", type=int, default=1, help="threads of torch and of onnxruntime (default: 1)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {args.calls} calls; single-observation latency in microseconds, median (p90)")
    rows = []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for label, obs_space, act_space, kwargs in POLICIES:
            torch.manual_seed(0)
            policy = ActorCritic(obs_space, act_space, **kwargs).eval()
            if policy.obs_norm is not None:  # statistics as after training, not the identity
                policy.obs_norm.update(torch.randn(1000, policy.obs_norm.mean.numel()) * 3 + 1)
            obs = _observation(obs_space, rng)
            paths = {}
            for fmt, suffix in (("onnx", ".onnx"), ("torchscript", ".torchscript.pt")):
                paths[fmt] = Path(d) / f"policy{len(rows)}{suffix}"
                export_policy(policy, paths[fmt], fmt)

            def torch_policy(obs: np.ndarray = obs, policy: ActorCritic = policy) -> np.ndarray:
                with torch.inference_mode():
                    x = policy.prepare(torch.as_tensor(obs).unsqueeze(0))
                    return policy.env_action(policy.act(x, deterministic=True)[0])

            def torch_minimal(obs: np.ndarray = obs, policy: ActorCritic = policy) -> np.ndarray:
                with torch.inference_mode():
                    out, _ = policy(policy.prepare(torch.as_tensor(obs).unsqueeze(0)))
                    return policy.env_action(policy.dist.mode(out))

            ts = ExportedModel(paths["torchscript"], "torchscript")._module
            obs_t = torch.from_numpy(obs).unsqueeze(0)

            def torchscript(ts: torch.jit.ScriptModule = ts, obs_t: torch.Tensor = obs_t) -> torch.Tensor:
                with torch.inference_mode():
                    return ts(obs_t)

            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = args.threads
            session = ort.InferenceSession(str(paths["onnx"]), options, providers=["CPUExecutionProvider"])
            feed = {"obs": obs[None]}

            def onnx(session: ort.InferenceSession = session, feed: dict = feed) -> list:
                return session.run(["action"], feed)

            a, b, c = torch_policy(), torchscript().numpy(), onnx()[0]
            assert np.allclose(a, b, atol=1e-5) and np.allclose(a, c, atol=1e-5), (a, b, c)  # the same policy
            timings = [_time(fn, args.calls) for fn in (torch_policy, torch_minimal, torchscript, onnx)]
            rows.append((label, *timings))

    names = ("torch (ppo-eval)", "torch, minimal", "TorchScript", "onnxruntime")
    head = f"{'policy':<56}" + "".join(f"{n:>17}" for n in names) + f"{'torch/ORT':>10}"
    print(head)
    print("-" * len(head))
    for label, *timings in rows:
        cells = "".join(f"{med:>8.1f} ({p90:>6.1f})" for med, p90 in timings)
        print(f"{label:<56}{cells}{timings[0][0] / timings[-1][0]:>9.1f}x")


if __name__ == "__main__":
    main()
