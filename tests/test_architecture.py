"""The pieces of one training iteration: the fast paths cover exactly what they were checked on, the torch and
numpy actors take the same actions from the same seed, the stopwatch adds up, and the checkpoint's keys are
the one list in checkpoint.STATE_KEYS."""

import time

import numpy as np
import pytest
import torch
from torch import nn

from ppo_cli.algo.fast.core import NumpyActor, covers
from ppo_cli.algo.rollout import TorchActor, choose_actor
from ppo_cli.algo.storage import Batch
from ppo_cli.algo.timing import Stopwatch
from ppo_cli.algo.update import AutogradGradients, Updater, UpdateSettings, make_optimizer
from ppo_cli.policy.actor_critic import ActorCritic
from ppo_cli.policy.heads import HEADS
from ppo_cli.run import checkpoint
from tests.conftest import TINY, make_cfg

OBS = {"type": "Box", "shape": [5]}
ACT = {"type": "Discrete", "n": 3}


class WithInputLayer(ActorCritic):
    """A user's subclass: one more layer in front of the encoders (the fast path knows nothing of it)."""

    def __init__(self) -> None:
        super().__init__(OBS, ACT, [16])
        self.input_layer = nn.Linear(5, 5)

    def prepare(self, obs: torch.Tensor) -> torch.Tensor:
        return obs.float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(torch.tanh(self.input_layer(x)))


def _batch(policy: nn.Module, n: int = 64) -> Batch:
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        actions, logp, values = policy.act(x, np.random.default_rng(0))
    return Batch(x, actions, logp + 0.1, values, torch.randn(n), values + torch.randn(n))


def test_a_policy_the_fast_path_does_not_cover_trains_with_autograd_and_says_so():
    settings = UpdateSettings(0.1, None, 0.01, 0.5, 0.5, 2, 16, True, None)
    params = []
    for fast in (True, False):
        torch.manual_seed(0)
        policy = WithInputLayer()
        activation, why = covers(policy)
        assert activation is None and "WithInputLayer" in why
        opt = make_optimizer(policy, "adam", 3e-4, 3e-4, 1e-5, 0.0)
        updater, notes = Updater.build(policy, opt, torch.Generator().manual_seed(0), fast_update=fast)
        assert isinstance(updater.gradients, AutogradGradients)
        assert notes == (["note: fast_update: computing gradients with autograd (WithInputLayer is not ppo-cli's "
                          "ActorCritic)"] if fast else [])
        before = policy.input_layer.weight.detach().clone()
        updater.update(_batch(policy), settings)
        assert not torch.equal(policy.input_layer.weight, before)  # the extra layer is trained too
        params.append([p.detach().clone() for p in policy.parameters()])
    for a, b in zip(*params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    actor, note = choose_actor(WithInputLayer(), np.random.default_rng(0), torch.device("cpu"), True, 2)
    assert isinstance(actor, TorchActor) and note.startswith("note: fast_rollout: acting through torch")


def test_the_fast_path_must_read_every_parameter():
    policy = ActorCritic(OBS, ACT, [16])
    assert covers(policy)[0] == "tanh"
    policy.extra = nn.Parameter(torch.zeros(3))  # a parameter no layer of the fast path reads
    activation, why = covers(policy)
    assert activation is None and "reads 8 of the policy's 9 parameter tensors" in why


@pytest.mark.parametrize("obs_space,normalize", [(OBS, False), (OBS, True), ({"type": "Discrete", "n": 4}, False)])
@pytest.mark.parametrize("kind", list(HEADS))
def test_torch_and_numpy_actors_take_the_same_actions_from_the_same_seed(obs_space, normalize, kind):
    spaces = {"Discrete": ACT, "MultiDiscrete": {"type": "MultiDiscrete", "shape": [2], "nvec": [2, 3],
                                                 "start": [0, 1]},
              "MultiBinary": {"type": "MultiBinary", "shape": [3]},
              "Box": {"type": "Box", "shape": [2], "low": [-1.0, -1.0], "high": [1.0, 1.0]}}
    torch.manual_seed(0)
    policy = ActorCritic(obs_space, spaces[kind], [16], normalize_obs=normalize)
    for p in policy.parameters():
        p.data.add_(0.5 * torch.randn_like(p))
    rng = np.random.default_rng(5)
    if obs_space["type"] == "Discrete":
        obs = [rng.integers(0, 4, size=8) for _ in range(20)]
    else:
        obs = [rng.normal(3.0, 2.0, size=(8, 5)) for _ in range(20)]
    results = []
    for make in (lambda r: TorchActor(policy, r, torch.device("cpu")), lambda r: NumpyActor(policy, "tanh", r)):
        if policy.obs_norm is not None:  # both actors fold the same observations into fresh statistics
            policy.obs_norm.load_state_dict({"mean": torch.zeros(5, dtype=torch.float64),
                                             "var": torch.ones(5, dtype=torch.float64),
                                             "count": torch.tensor(1e-8, dtype=torch.float64)})
        actor = make(np.random.default_rng(1))
        steps = []
        for o in obs:
            x = actor.inputs(o)
            a, logp, v = actor.act(x)
            steps.append([np.asarray(t) for t in (x, a, logp, v, actor.env_action(a))])
        results.append(steps)
    for torch_step, numpy_step in zip(*results, strict=True):
        t_x, t_a, t_logp, t_v, t_env = torch_step
        n_x, n_a, n_logp, n_v, n_env = numpy_step
        np.testing.assert_array_equal(t_x, n_x)  # the same network input, bit for bit
        if kind == "Box":
            np.testing.assert_allclose(t_a, n_a, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(t_a, n_a)  # the same draws make the same choices
        np.testing.assert_allclose(t_logp, n_logp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(t_v, n_v, rtol=1e-5, atol=1e-5)
        assert t_env.dtype == n_env.dtype and t_env.shape == n_env.shape


def _train(*overrides, tmp_path):
    from ppo_cli.run.runner import Runner

    trainer = Runner(make_cfg(*TINY, "eval.final=false", "eval.objective=train", "checkpoint_interval=0",
                               *overrides), tmp_path, rich_progress=False)
    first = {}
    original = trainer.algo.buffer.advantages

    def record(*args, **kwargs):
        if not first:
            first.update(actions=trainer.algo.buffer.actions.clone(), rewards=trainer.algo.buffer.rewards.clone())
        return original(*args, **kwargs)

    trainer.algo.buffer.advantages = record
    trainer.run()
    trainer.close()
    return trainer, first


def test_fast_rollout_does_not_change_the_run(tmp_path):
    """Both actors draw from the same numpy stream: the same actions in the same states, so the same episodes;
    the numbers differ only by the float rounding of numpy against torch kernels."""
    fast, fast_first = _train("fast_rollout=true", tmp_path=tmp_path / "a")
    slow, slow_first = _train("fast_rollout=false", tmp_path=tmp_path / "b")
    assert isinstance(fast.algo.actor, NumpyActor) and isinstance(slow.algo.actor, TorchActor)
    assert torch.equal(fast_first["actions"], slow_first["actions"])
    assert torch.equal(fast_first["rewards"], slow_first["rewards"])
    for a, b in zip(fast.algo.policy.parameters(), slow.algo.policy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_checkpoint_holds_exactly_the_listed_state(tmp_path):
    from pathlib import Path

    trainer, _ = _train(tmp_path=tmp_path)
    assert set(trainer.state()) == set(checkpoint.STATE_KEYS)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "checkpoint-format.md").read_text()
    assert [k for k in checkpoint.STATE_KEYS if f"`{k}`" not in doc] == []


def test_stopwatch_counts_each_stage_once():
    clock = Stopwatch(("outer", "inner"))
    t0 = time.perf_counter()
    with clock["outer"]:
        time.sleep(0.02)
        for _ in range(3):
            with clock["inner"]:
                time.sleep(0.01)
    wall = time.perf_counter() - t0
    assert 0.03 <= clock.seconds["inner"] < clock.seconds["outer"] + 0.03
    assert clock.seconds["outer"] >= 0.02
    assert abs(clock.total() - wall) < 0.02  # nested time is not counted twice (0.03 s would be)


def test_format_1_checkpoints_still_load_and_evaluate(tiny_run, tmp_path):
    """Version 1 named the encoders trunks and kept log_std on the policy; load migrates it."""
    from ppo_cli.cli.evaluate import load_policy
    from tests.conftest import cli

    path = tiny_run / "checkpoints" / "checkpoint.pt"
    data = torch.load(path, weights_only=True)
    old_names = {"actor_encoder.": "actor_trunk.", "critic_encoder.": "critic_trunk.", "dist.log_std": "log_std"}

    def v1(key: str) -> str:
        for new, old in old_names.items():
            if key.startswith(new):
                return old + key[len(new):]
        return key

    v1_path = tmp_path / "v1.pt"
    torch.save({**data, "format_version": 1, "policy": {v1(k): v for k, v in data["policy"].items()}}, v1_path)
    assert any(k.startswith("actor_trunk.") for k in torch.load(v1_path, weights_only=True)["policy"])
    policy, _ = load_policy(checkpoint.load(v1_path))
    for key, value in policy.state_dict().items():
        assert torch.equal(value, data["policy"][key]), key
    out = cli("ppo-eval", str(v1_path), "--json", "--episodes", "2", "--no-random-baseline", cwd=tmp_path,
              check=True)
    ref = cli("ppo-eval", str(path), "--json", "--episodes", "2", "--no-random-baseline", cwd=tmp_path, check=True)
    assert out.stdout.split('"checkpoint"')[0] == ref.stdout.split('"checkpoint"')[0]


# --- the package's shape: stages in the order data flows, nothing below importing anything above ----------------
# Base modules every stage may use; then the stages, lowest first. Public modules that configs and checkpoints name
# (ppo_cli.wrappers, ppo_cli.example_envs) keep their stable top-level names and sit with the envs.
STAGES = [("errors", "config", "devices", "distributed"), ("envs", "wrappers", "example_envs"), ("policy",),
          ("algo",), ("run",), ("cli",)]


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "ppo_cli" or len(parts) < 2:
        return None
    return next((i for i, names in enumerate(STAGES) if parts[1] in names), None)


def _imports(path) -> list[str]:
    """Every ppo_cli module `path` imports, at module level or inside functions."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppo_cli"):
            found += [f"{node.module}.{a.name}" if node.module == "ppo_cli" else node.module for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("ppo_cli")]
    return found


def test_every_module_belongs_to_a_stage_and_imports_nothing_above_it():
    from pathlib import Path

    root = Path(__file__).parents[1] / "ppo_cli"
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if module in ("ppo_cli", "ppo_cli.conf"):
            continue
        own = _stage(module)
        if own is None:
            problems.append(f"{module} belongs to no stage")
            continue
        problems += [f"{module} (stage {own}) imports {imported} (stage {_stage(imported)})"
                     for imported in _imports(path) if (_stage(imported) or 0) > own]
    assert problems == []


# --- start-up by stage (issue 29, item 6) --------------------------------------------------------------------------

def test_ppo_train_starts_without_torch_and_a_run_that_compiles_nothing_never_imports_dynamo(tmp_path):
    """`ppo-train --help`, argument errors and sweep launchers import ppo-train's entry point only: no torch
    (1.3 s). A run that compiles nothing keeps torch._dynamo (about 1 s more) out: torch.optim's methods would
    import it at their first call (compiled.skip_dynamo_import, FusedAdamStep's own state)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    probe = "import sys, ppo_cli.cli.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
    run = ("import sys, runpy; sys.argv = ['ppo-train', *sys.argv[1:]]\n"
           "try:\n    runpy.run_module('ppo_cli.cli.train', run_name='__main__')\n"
           "finally:\n    print('dynamo:', 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", run, *TINY, "eval.every_steps=128", f"hydra.run.dir={tmp_path / 'r'}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dynamo: False" in out.stdout


def test_the_fast_path_refuses_a_head_or_observation_part_it_has_no_twin_for():
    from ppo_cli.algo.fast.core import covers
    from ppo_cli.policy.heads import Categorical
    from ppo_cli.policy.observations import BoxPart

    class Tempered(Categorical):  # maths of its own: the numpy twin of Categorical does not compute it
        pass

    policy = ActorCritic(OBS, ACT, [16])
    assert covers(policy)[0] == "tanh"
    policy.dist = Tempered(ACT)
    assert covers(policy) == (None, "the Tempered action head has no numpy twin (fast/heads.py)")

    class Scaled(BoxPart):
        pass

    policy = ActorCritic(OBS, ACT, [16])
    policy.layout.parts = [Scaled(None, OBS)]
    assert covers(policy) == (None, "the observation parts Scaled have no numpy encoder (fast/observations.py)")


def test_ppo_eval_and_ppo_export_answer_help_and_usage_errors_without_torch():
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    for tool in ("evaluate", "export"):
        for args in (["--help"], []):
            probe = (f"import sys\nsys.argv = ['ppo-{tool}', *{args!r}]\nfrom ppo_cli.cli import launch\n"
                     f"try:\n    launch.{tool}()\nexcept SystemExit as e:\n    print('exit', e.code)\n"
                     f"print('torch' in sys.modules)")
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
            code = "exit 0" if args else "exit 2"
            assert out.stdout.strip().splitlines()[-2:] == [code, "False"], (tool, args, out.stdout, out.stderr)
