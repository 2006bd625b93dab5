"""ppo-export: the exported ONNX / TorchScript policy equals the checkpoint policy (each action head, with and without
observation normalization; Discrete observations, a Discrete start, float64 bounds, Dict observations with masks,
info masks, a recurrent and a CNN policy), ppo-eval plays it to the same returns, and bad input gets one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from ppo_cli.cli import evaluate as eval_cli
from ppo_cli.cli import export as export_cli
from ppo_cli.cli.evaluate import load_policy
from ppo_cli.envs.make import make_vec_env
from ppo_cli.policy import export, exported, formats
from ppo_cli.policy.observations import as_tensors
from ppo_cli.run import checkpoint
from ppo_cli.run.runner import Runner

from .conftest import ROOT, TINY, cli, make_cfg

pytest.importorskip("onnxruntime", reason="the 'export' extra is not installed: pip install '.[export]'")
pytest.importorskip("onnx", reason="the 'export' extra is not installed: pip install '.[export]'")

N_OBS = 1000
ATOL = 1e-5
# Two updates: real observation statistics, quickly. The outputs' equality does not depend on training.
QUICK = [*TINY, "algo.total_timesteps=128", "eval.final=false"]


class ShiftedCorridor(gym.Env):
    """Corridor with Discrete(3, start=-1) actions (-1 left, 0 stay, +1 right): the start offset must be applied."""

    def __init__(self, length: int = 6):
        self.length, self.pos = length, 0
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(3, start=-1)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = int(self.np_random.integers(self.length))
        return np.array([self.pos / self.length], np.float32), {}

    def step(self, action):
        assert self.action_space.contains(action), action
        self.pos = min(max(0, self.pos + int(action)), self.length)
        done = self.pos == self.length
        return np.array([self.pos / self.length], np.float32), 1.0 if done else -0.01 * self.pos, done, False, {}


gym.register("ShiftedCorridor-v0", entry_point="tests.test_export:ShiftedCorridor", max_episode_steps=30)

# The matrix: each action head, with and without observation normalization.
HEADS = {
    "Discrete": ["env.id=CartPole-v1"],
    "Box": ["env.id=tests.custom_env:Reach-v0"],
    "MultiDiscrete": ["env.entry_point=tests.custom_env:MatchDigits"],  # start [1, 1]
    "MultiBinary": ["env.entry_point=tests.custom_env:MatchBits"],
}
# What else the graph has to get right.
EXTRAS = {
    "discrete-obs": ["env.id=FrozenLake-v1"],  # one-hot input
    "discrete-start": ["env.id=ShiftedCorridor-v0", "env.normalize_obs=true"],
    "float64-box": ["env.entry_point=tests.custom_env:StrictFloat64", "env.normalize_obs=true"],  # bounds +-0.1
    "dict-obs-mask": ["env.entry_point=tests.custom_env:MaskedDigits", "env.normalize_obs=true"],
    "lstm": ["env.entry_point=tests.custom_env:RepeatCue", "network.recurrent=lstm", "network.rnn_hidden=16",
             "network.net_arch=[16]", "algo.batch_size=128"],
    "cnn": ["env.entry_point=tests.test_pixels:LitCell", "network=cnn"],
    "cnn-dict": ["env.entry_point=tests.test_pixels:LitCell", "+env.kwargs.mirror=true", "network=cnn"],
}
CASES = {**{f"{h}-{'norm' if n else 'raw'}": [*o, f"env.normalize_obs={str(n).lower()}"]
            for h, o in HEADS.items() for n in (False, True)}, **EXTRAS}


def _checkpoint(tmp_path: Path, overrides: list[str]) -> Path:
    """A trained tiny policy whose head outputs are scaled up: logits far apart (no near-ties for the argmax to
    break differently in float32) and Gaussian means well outside the bounds (so the clip is exercised)."""
    trainer = Runner(make_cfg(*QUICK, *overrides), tmp_path / "run", rich_progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.run()
    trainer.close()
    data = checkpoint.load(tmp_path / "run" / "checkpoints" / "checkpoint.pt")
    data["policy"]["policy_head.weight"] = data["policy"]["policy_head.weight"] * 100.0
    data["policy"]["policy_head.bias"] = data["policy"]["policy_head.bias"] + torch.linspace(
        -1.0, 1.0, data["policy"]["policy_head.bias"].numel())
    path = tmp_path / "sharp.pt"
    checkpoint.save({k: v for k, v in data.items() if k not in ("format", "format_version", "ppo_cli_version")}, path)
    return path


def _env_observations(cfg, n: int = N_OBS) -> tuple[object, np.ndarray | None]:
    """n observations from the env itself (random actions through whole episodes), and their action masks."""
    envs = make_vec_env(cfg.env, seed=123, num_envs=8)
    envs.action_space.seed(123)
    obs, info = envs.reset(seed=123)
    batches = []
    while len(batches) * 8 < n:
        batches.append(obs)
        if isinstance(obs, dict) and "action_mask" in obs:  # a random action would break MaskedDigits
            obs, *_ = envs.step(np.stack([_allowed(m) for m in obs["action_mask"]]))
        else:
            obs, *_ = envs.step(envs.action_space.sample())
    envs.close()
    if isinstance(batches[0], dict):
        all_obs = {k: np.concatenate([b[k] for b in batches])[:n] for k in batches[0]}
        return all_obs, (all_obs["action_mask"] != 0 if "action_mask" in all_obs else None)
    return np.concatenate(batches)[:n], None


def _allowed(mask: np.ndarray) -> np.ndarray:
    return np.array([int(np.flatnonzero(mask[:3])[0]), int(np.flatnonzero(mask[3:])[0])])


def _export(path: Path, fmt: str, *args: str) -> Path:
    out = path.parent / f"{path.stem}-{'-'.join(a.strip('-') for a in args) or 'plain'}{formats.SUFFIXES[fmt]}"
    export_cli.main([str(path), "--format", fmt, "--out", str(out), *args, "--trust-env-code"])  # the user's own envs
    return out


def _policy_outputs(policy, obs, mask, state):
    """What the checkpoint policy computes, as ppo-eval runs it: env actions, head outputs, values, next state."""
    with torch.no_grad():
        x = policy.prepare(as_tensors(obs))
        m = None if mask is None else torch.as_tensor(mask)
        out, value, new_state = policy.step(x, state)
        action = policy.env_action(policy.dist.mode(out, m))
        if m is not None:
            out = torch.where(m, out, torch.finfo(out.dtype).min)
    return action, out.numpy(), value.numpy(), None if new_state is None else new_state.numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_exported_policy_equals_the_checkpoint_policy_and_plays_the_same(case, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, CASES[case])
    data = checkpoint.load(ckpt)
    policy, cfg = load_policy(data)
    obs, mask = _env_observations(cfg)
    state = None
    if policy.state_size:  # a recurrent policy: any state in, its successor out
        state = torch.randn(N_OBS, policy.state_size, generator=torch.Generator().manual_seed(0))
    action, out, value, new_state = _policy_outputs(policy, obs, mask, state)
    np_state = None if state is None else state.numpy()
    if case.startswith("Box"):  # the clip is exercised: some means beyond the bounds, some inside
        assert (np.abs(action) == 1.0).any() and (np.abs(action) < 1.0).any()
    if case == "float64-box":
        assert action.dtype == np.float64 and np.abs(action).max() <= 0.1  # clipped in float64, as the env checks

    for fmt in formats.FORMATS:
        deterministic = exported.ExportedModel(_export(ckpt, fmt, "--with-value"), fmt, run_code=True)
        got = deterministic.run(deterministic.feeds(obs, mask, np_state))
        assert got["action"].dtype == action.dtype and got["action"].shape == action.shape, (fmt, got["action"].shape)
        if action.dtype.kind == "f":
            np.testing.assert_allclose(got["action"], action, atol=ATOL, rtol=0)
        else:
            np.testing.assert_array_equal(got["action"], action)
        np.testing.assert_allclose(got["value"], value, atol=ATOL, rtol=0)
        if new_state is not None:
            np.testing.assert_allclose(got["state_out"], new_state, atol=ATOL, rtol=0)

        stochastic = exported.ExportedModel(_export(ckpt, fmt, "--stochastic"), fmt, run_code=True)
        got = stochastic.run(stochastic.feeds(obs, mask, np_state))
        if "mean" in got:
            np.testing.assert_allclose(got["mean"], out, atol=ATOL, rtol=0)
            log_std = policy.dist.log_std.detach().numpy()
            np.testing.assert_allclose(got["log_std"], np.broadcast_to(log_std, out.shape), atol=ATOL, rtol=0)
        else:
            np.testing.assert_allclose(got["logits"], out, atol=ATOL, rtol=0)
    capsys.readouterr()

    # ppo-eval: the checkpoint and each exported file on the same seeds.
    def eval_json(path: Path, *extra: str) -> dict:
        eval_cli.main([str(path), "--episodes", "4", "--seed", "3", "--json", "--no-random-baseline",
                       "--trust-env-code", *extra])
        return json.loads(capsys.readouterr().out)

    reference = eval_json(ckpt)
    for fmt in formats.FORMATS:
        result = eval_json(tmp_path / f"sharp-with-value{formats.SUFFIXES[fmt]}")
        assert result["model_format"] == fmt
        assert result["mean_return"] == pytest.approx(reference["mean_return"], abs=ATOL)
        assert result["returns"] == pytest.approx(reference["returns"], abs=ATOL)
        assert result["mean_length"] == reference["mean_length"]
        assert result["global_step"] == reference["global_step"] == 128


def test_stochastic_export_samples_as_the_checkpoint_policy_does(tmp_path, capsys):
    """ppo-eval --stochastic of a --stochastic export draws the same actions from the same seed."""
    ckpt = _checkpoint(tmp_path, ["env.id=CartPole-v1"])
    model = _export(ckpt, "onnx", "--stochastic")
    capsys.readouterr()
    results = []
    for path in (ckpt, model):
        eval_cli.main([str(path), "--episodes", "4", "--json", "--no-random-baseline", "--stochastic"])
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["returns"] == results[1]["returns"] and not results[1]["deterministic"]
    # A deterministic export cannot sample: one line, exit 2.
    model = _export(ckpt, "onnx")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        eval_cli.main([str(model), "--episodes", "2", "--stochastic"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exported with --stochastic" in err


def test_info_masks_need_an_action_mask_input(tmp_path, capsys):
    """MaskedGrid gives masks in info and refuses a masked move: exported without --action-mask, ppo-eval says how
    to fix it; with it, the model plays as the checkpoint does."""
    ckpt = _checkpoint(tmp_path, ["env=MaskedGrid-v0"])
    eval_cli.main([str(ckpt), "--episodes", "3", "--json", "--no-random-baseline"])
    reference = json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit) as exc:
        eval_cli.main([str(_export(ckpt, "onnx")), "--episodes", "3"])
    assert exc.value.code == 2 and "export it with --action-mask" in capsys.readouterr().err
    for fmt in formats.FORMATS:
        model = _export(ckpt, fmt, "--action-mask")
        meta = json.loads(export.sidecar_path(model).read_text())
        assert [p["name"] for p in meta["inputs"]] == ["obs", "action_mask"]
        capsys.readouterr()
        eval_cli.main([str(model), "--episodes", "3", "--json", "--no-random-baseline", "--trust-env-code"])
        assert json.loads(capsys.readouterr().out)["returns"] == reference["returns"]


def test_any_batch_size_and_the_sidecar_describes_the_model(tmp_path):
    ckpt = _checkpoint(tmp_path, ["env.id=tests.custom_env:Reach-v0", "env.normalize_obs=true"])
    policy, _ = load_policy(checkpoint.load(ckpt))
    for fmt in formats.FORMATS:
        path = _export(ckpt, fmt, "--with-value")
        meta = json.loads(export.sidecar_path(path).read_text())
        assert meta["format"] == "ppo-cli-export" and meta["model_format"] == fmt and meta["model_file"] == path.name
        assert meta["ppo_cli_version"] and meta["obs_normalization"] and meta["global_step"] == 128
        assert meta["observation_space"] == {"type": "Box", "shape": [2]}
        assert meta["action_space"] == {"type": "Box", "shape": [1], "low": [-1.0], "high": [1.0]}
        assert meta["inputs"] == [{"name": "obs", "dtype": "float32", "shape": ["batch", 2]}]
        assert meta["outputs"] == [{"name": "action", "dtype": "float32", "shape": ["batch", 1]},
                                   {"name": "value", "dtype": "float32", "shape": ["batch"]}]
        assert meta["env_id"] == "tests.custom_env:Reach-v0" and meta["env"]["normalize_obs"] is True
        model = exported.ExportedModel(path, fmt, run_code=True)
        assert model.metadata == meta  # the copy inside the model is the sidecar
        for n in (1, 7, 64):
            obs = np.random.default_rng(n).uniform(-1, 1, (n, 2)).astype(np.float32)
            got = model.run({"obs": obs})
            assert got["action"].shape == (n, 1) and got["value"].shape == (n,)
            np.testing.assert_allclose(got["action"], _policy_outputs(policy, obs, None, None)[0], atol=ATOL, rtol=0)
    # The description inside is enough: without its sidecar the model still loads and plays.
    onnx_path = tmp_path / "sharp-with-value.onnx"
    export.sidecar_path(onnx_path).unlink()
    assert exported.detect(onnx_path) == "onnx" and exported.ExportedModel(onnx_path, "onnx").metadata["with_value"]
    assert exported.detect(ckpt) is None


def _docs_example() -> str:
    text = (ROOT / "docs" / "export.md").read_text()
    block = re.search(r"<!-- standalone example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/export.md lost its standalone example"
    return block.group(1)


def test_the_docs_standalone_example(tmp_path):
    """The example of docs/export.md, run as written in a fresh interpreter next to an exported CartPole policy:
    at most 15 lines, numpy and onnxruntime only (torch and ppo_cli never imported), and the action is the
    policy's."""
    code = _docs_example()
    assert len(code.strip().splitlines()) <= 15
    assert set(re.findall(r"^(?:import|from) (\w+)", code, re.M)) <= {"numpy", "onnxruntime"}
    ckpt = _checkpoint(tmp_path, ["env.id=CartPole-v1", "env.normalize_obs=true"])
    export_cli.main([str(ckpt), "--out", str(tmp_path / "policy.onnx")])
    check = "\nimport sys\nassert 'torch' not in sys.modules and 'ppo_cli' not in sys.modules\nprint(int(action))\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    values = re.search(r"obs = np\.array\(\[(.*?)\]", code).group(1)
    obs = np.array([float(v) for v in values.split(",")], np.float32)
    policy, _ = load_policy(checkpoint.load(ckpt))
    assert int(proc.stdout.split()[-1]) == int(_policy_outputs(policy, obs[None], None, None)[0][0])


# --- bad input: one line on stderr, exit 2, no model file --------------------------------------------------------
def _fails(capsys, main, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bad_checkpoints_formats_and_paths_get_one_line_and_exit_2(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:3000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    cases = [
        ([str(corrupt)], "truncated or corrupt"),
        ([str(foreign)], "not a ppo-cli checkpoint"),
        ([str(tmp_path / "missing.pt")], "does not exist"),
        ([str(ckpt), "--format", "tflite"], "--format tflite: unknown format (choose onnx or torchscript)"),
        ([str(ckpt), "--out", str(ckpt / "x.onnx")], "cannot write"),  # a file in the way of the folder
        ([str(ckpt), "--out", str(tmp_path)], "cannot write"),  # a folder where the file should go
        ([str(ckpt), "--out", str(ckpt)], "is the checkpoint itself"),
        ([str(ckpt), "--action-mask", "--format", "torchscript", "--out", str(tmp_path / "m.pt")], None),
    ]
    for argv, fragment in cases:
        if fragment is None:  # CartPole's Discrete head takes masks: fine
            export_cli.main(argv)
            continue
        err = _fails(capsys, export_cli.main, argv)
        assert err.startswith("ppo-export: error: ") and fragment in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pt", "foreign.pt", "m.pt", "m.pt.json", "run"]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt"]  # no model, no temporary file


def test_a_failed_write_keeps_the_previous_model_whole(tiny_run, capsys, monkeypatch):
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    export_cli.main([str(ckpt)])
    model = ckpt.with_name("checkpoint.onnx")
    before = model.read_bytes(), export.sidecar_path(model).read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    err = _fails(capsys, export_cli.main, [str(ckpt), "--with-value"])
    assert "No space left on device" in err and "nothing was written" in err
    assert (model.read_bytes(), export.sidecar_path(model).read_bytes()) == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.onnx", "checkpoint.onnx.json",
                                                             "checkpoint.pt"]


def test_missing_extra_gets_one_line_naming_it(tiny_run, tmp_path, capsys, monkeypatch):
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    export_cli.main([str(ckpt), "--out", str(tmp_path / "m.onnx")])
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    err = _fails(capsys, export_cli.main, [str(ckpt), "--out", str(tmp_path / "n.onnx")])
    assert "needs the onnx package" in err and 'pip install ".[export]"' in err
    assert not (tmp_path / "n.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = _fails(capsys, eval_cli.main, [str(tmp_path / "m.onnx")])
    assert err.startswith("ppo-eval: error: ") and "needs onnxruntime" in err and 'pip install ".[export]"' in err
    export_cli.main([str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.torchscript.pt")])  # no extra


def test_ppo_eval_refuses_bad_exported_files(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    bare = tmp_path / "bare.onnx"  # a valid ONNX file that ppo-export did not write
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.zeros(1, 4),), str(bare), dynamo=False)
    ts = tmp_path / "m.torchscript.pt"
    export_cli.main([str(ckpt), "--format", "torchscript", "--out", str(ts)])
    ts.write_bytes(ts.read_bytes()[:500])  # truncated
    for path, fragment in ((corrupt, "is not a valid ONNX model"), (bare, "was not written by ppo-export"),
                           (ts, "is not a TorchScript model"), (tmp_path / "none.onnx", "does not exist")):
        err = _fails(capsys, eval_cli.main, [str(path)])
        assert err.startswith("ppo-eval: error: ") and fragment in err, err
    model = tmp_path / "m.onnx"
    export_cli.main([str(ckpt), "--out", str(model)])
    err = _fails(capsys, eval_cli.main, [str(model), "--env", "Acrobot-v1"])
    assert "has spaces" in err


def test_cli_end_to_end_as_a_user_runs_it(tiny_run, tmp_path, capsys):
    """ppo-export and ppo-eval in subprocesses, as a user runs them: the summary printed, and the checkpoint's
    returns (and random baseline) from the exported file."""
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ppo_cli.cli.export", str(ckpt), "--with-value"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = ckpt.with_name("checkpoint.onnx")
    assert f"wrote {model}" in proc.stdout and "inputs:  obs float32 [batch, 4]" in proc.stdout
    assert "outputs: action int64 [batch]; value float32 [batch]" in proc.stdout
    exported = json.loads(cli("ppo-eval", str(model), "--episodes", "3", "--json", cwd=tmp_path, check=True).stdout)
    eval_cli.main([str(ckpt), "--episodes", "3", "--json"])
    reference = json.loads(capsys.readouterr().out)
    assert exported["returns"] == reference["returns"]
    assert exported["random_mean_return"] == reference["random_mean_return"]
    eval_cli.main([str(model), "--episodes", "2"])
    assert capsys.readouterr().out.startswith(f"model:        {model} (onnx export of a policy trained 256 steps)")
    exe = Path(sys.executable).parent / "ppo-export"
    if exe.exists():  # the console script, where the project is installed
        assert "--with-value" in subprocess.run([str(exe), "--help"], capture_output=True, text=True).stdout
