"""Issue 30, items 1-6: a config read from a file (a checkpoint, an exported model) is data. Nothing in it is
imported, located, instantiated or interpolated without the user's word, however it is nested or spelled; the
exceptions are recipe.py's allowlist, identified by what a name finds, with plain-data arguments."""

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ppo_cli.cli import evaluate as eval_cli
from ppo_cli.cli import export as export_cli
from ppo_cli.config import EnvConfig
from ppo_cli.envs import make as envs
from ppo_cli.envs import recipe
from ppo_cli.policy import export

from .conftest import cli


def _crafted(ckpt: Path, out: Path, edits: list[tuple[str, str]]) -> Path:
    data = torch.load(ckpt, weights_only=True)
    text = data["config_yaml"]
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new, 1)
    torch.save({**data, "config_yaml": text}, out)
    return out


def _wrappers(text: str) -> list[tuple[str, str]]:
    return [("wrappers: []", f"wrappers: [{text}]")]


def _evil_module(tmp: Path, marker: Path, monkeypatch) -> None:
    """A module on the path whose import alone writes the marker."""
    (tmp / "evil_env_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nx = 1\n")
    monkeypatch.syspath_prepend(str(tmp))


# The variants of issue 30 (items 1, 2, 3, 5): the YAML edits, given the marker a run of their code would write,
# and what the one line must name. Each is tried on ppo-eval, ppo-export and (a few) ppo-train resume=.
VARIANTS = {
    "nested-savetxt": (lambda m: _wrappers(f"{{_target_: gymnasium.wrappers.TransformReward, func: {{_target_: "
                                           f"numpy.savetxt, _args_: ['{m}', [1.0]]}}}}"),
                       "env.wrappers[0].func._target_=numpy.savetxt (a nested target)"),
    "nested-in-an-allowed-wrapper": (lambda m: _wrappers(f"{{_target_: gymnasium.wrappers.TimeLimit, "
                                                         f"max_episode_steps: {{_target_: pathlib.Path.touch, "
                                                         f"_args_: ['{m}']}}}}"),
                                     "env.wrappers[0].max_episode_steps._target_=pathlib.Path.touch (a nested target)"),
    "nested-in-kwargs": (lambda m: [("kwargs: {}", f"kwargs: {{sutton_barto_reward: {{_target_: pathlib.Path.touch, "
                                                   f"_args_: ['{m}']}}}}")],
                         "env.kwargs.sutton_barto_reward._target_=pathlib.Path.touch (a nested target)"),
    "attribute-of-gymnasium": (lambda m: _wrappers(f"{{_target_: gymnasium.utils.seeding.np.savez, _args_: ['{m}']}}"),
                               "env.wrappers[0]._target_=gymnasium.utils.seeding.np.savez (is numpy.savez, not on the "
                               "allowlist)"),
    "attribute-of-ppo-cli": (lambda m: _wrappers(f"{{_target_: ppo_cli.run.runner.os.system, _args_: ['touch {m}']}}"),
                             "env.wrappers[0]._target_=ppo_cli.run.runner.os.system ("),
    "hydra-key": (lambda m: _wrappers("{_target_: gymnasium.wrappers.TimeLimit, _partial_: true, "
                                      "max_episode_steps: 5}"),
                  "env.wrappers[0]._partial_=True (a Hydra instantiation key)"),
    "generic-loader": (lambda m: [("entry_point: null",
                                   "entry_point: gymnasium.envs.registration:load_env_creator"),
                                  ("kwargs: {}", "kwargs: {name: 'evil_env_module:x'}")],
                       "env.entry_point=gymnasium.envs.registration:load_env_creator (is "
                       "gymnasium.envs.registration.load_env_creator, not on the allowlist)"),
    "module-id": (lambda m: [("id: CartPole-v1", "id: evil_env_module:Evil-v0")],
                  "env.id=evil_env_module:Evil-v0 (imports module evil_env_module)"),
    "interpolation-env-var": (lambda m: [("gamma: 0.99", "gamma: ${oc.env:PPO_CLI_SECRET}")],
                              "config would import, call or resolve: algo.gamma=${oc.env:PPO_CLI_SECRET} (an "
                              "interpolation)"),
    "interpolation-resolver": (lambda m: [("kwargs: {}", "kwargs: {x: '${fresh_dir:/tmp}'}")],
                               "env.kwargs.x=${fresh_dir:/tmp} (an interpolation)"),
}
SECRET = "s3cr3t-value-of-the-environment"


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(main, argv: list[str], capsys, tool: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert stop.value.code == 2 and out == "" and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{tool}: error: "), lines[0]
    return lines[0]


@pytest.fixture
def crafted(tiny_run, tmp_path, monkeypatch):
    """make(variant) -> (the crafted checkpoint, the marker its code would write, the fragment to expect)."""
    monkeypatch.setenv("PPO_CLI_SECRET", SECRET)
    marker = tmp_path / "pwned"
    _evil_module(tmp_path, marker, monkeypatch)

    def make(variant: str) -> tuple[Path, Path, str]:
        edits, fragment = VARIANTS[variant]
        return _crafted(tiny_run / "checkpoints" / "checkpoint.pt", tmp_path / "evil.pt", edits(marker)), marker, \
            fragment

    return make


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ppo_eval_and_ppo_export_run_nothing_a_checkpoint_names(variant, crafted, tmp_path, capsys):
    ckpt, marker, fragment = crafted(variant)
    before = _digest(tmp_path)
    line = _refused(eval_cli.main, [str(ckpt)], capsys, "ppo-eval")
    assert fragment in line and f"; refused, nothing was run. If you trust {ckpt}, add --trust-env-code" in line
    assert SECRET not in line and "evil_env_module" not in sys.modules
    line = _refused(export_cli.main, [str(ckpt), "--format", "torchscript"], capsys, "ppo-export")
    assert fragment in line and line.endswith(f"If you trust {ckpt}, add --trust-env-code")
    assert not marker.exists() and "evil_env_module" not in sys.modules
    assert _digest(tmp_path) == before  # nothing written: no model, no marker


@pytest.mark.parametrize("variant", ["nested-savetxt", "attribute-of-gymnasium", "generic-loader",
                                     "interpolation-env-var"])
def test_ppo_train_resume_runs_nothing_a_checkpoint_names(variant, tiny_run, tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil_env_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nx = 1\n")
    edits, fragment = VARIANTS[variant]
    ckpt = _crafted(tiny_run / "checkpoints" / "checkpoint.pt", tiny_run / "checkpoints" / "checkpoint.pt",
                    [*edits(marker), ("trust_env_code: false", "trust_env_code: true")])  # it cannot vouch for itself
    before = _digest(tmp_path)
    proc = cli("ppo-train", f"resume={ckpt}", cwd=tmp_path,
               env={"PPO_CLI_SECRET": SECRET, "PYTHONPATH": f"{tmp_path}:{Path(__file__).parents[1]}"})
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert fragment in lines[0] and "add trust_env_code=true (or set those keys on the command line)" in lines[0]
    assert SECRET not in lines[0] and not marker.exists()
    assert _digest(tmp_path) == before


def test_trusted_interpolations_resolve_or_fail_in_one_line(tiny_run, tmp_path, capsys):
    ckpt = _crafted(tiny_run / "checkpoints" / "checkpoint.pt", tmp_path / "t.pt",
                    [("kwargs: {}", "kwargs: {x: '${no_such_resolver:1}'}")])
    line = _refused(eval_cli.main, [str(ckpt), "--trust-env-code"], capsys, "ppo-eval")
    assert "the checkpoint's config cannot be resolved (Unsupported interpolation type no_such_resolver" in line


# --- exported models (item 4) and TorchScript (item 6) --------------------------------------------------------------

def _onnx_with_env(source: Path, out: Path, env: dict) -> Path:
    """A copy of the ONNX model `source` whose embedded metadata (and sidecar) carry `env` as the recipe."""
    import onnx

    model = onnx.load(str(source))
    entry = next(p for p in model.metadata_props if p.key == export.METADATA_KEY)
    meta = json.loads(entry.value)
    meta["env"] = {**meta["env"], **env}
    entry.value = json.dumps(meta)
    onnx.save(model, str(out))
    export.sidecar_path(out).write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(("env", "fragment"), [
    ({"wrappers": [{"_target_": "gymnasium.wrappers.TransformReward",
                    "func": {"_target_": "numpy.savetxt", "_args_": ["MARKER", [1.0]]}}]},
     "env.wrappers[0].func._target_=numpy.savetxt (a nested target)"),
    ({"wrappers": [{"_target_": "gymnasium.utils.seeding.np.savez", "_args_": ["MARKER"]}]},
     "env.wrappers[0]._target_=gymnasium.utils.seeding.np.savez (is numpy.savez, not on the allowlist)"),
    ({"kwargs": {"x": "${oc.env:PPO_CLI_SECRET}"}}, "env.kwargs.x=${oc.env:PPO_CLI_SECRET} (an interpolation)"),
])
def test_an_exported_models_recipe_runs_nothing(env, fragment, tiny_run, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("PPO_CLI_SECRET", SECRET)
    marker = tmp_path / "pwned"
    env = json.loads(json.dumps(env).replace("MARKER", str(marker)))
    clean = tmp_path / "clean.onnx"
    export_cli.main([str(tiny_run / "checkpoints" / "checkpoint.pt"), "--out", str(clean)])
    capsys.readouterr()
    model = _onnx_with_env(clean, tmp_path / "evil.onnx", env)
    line = _refused(eval_cli.main, [str(model)], capsys, "ppo-eval")
    assert f"the model's env recipe would import or call code: {fragment}" in line or fragment in line
    assert f"If you trust {model}, add --trust-env-code" in line and SECRET not in line and not marker.exists()


def test_a_torchscript_model_is_loaded_only_on_the_users_word(tiny_run, tmp_path, monkeypatch, capsys):
    model = tmp_path / "m.torchscript.pt"
    export_cli.main([str(tiny_run / "checkpoints" / "checkpoint.pt"), "--format", "torchscript", "--out", str(model)])
    capsys.readouterr()
    loads = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    line = _refused(eval_cli.main, [str(model), "--episodes", "1"], capsys, "ppo-eval")
    assert f"model {str(model)!r} is TorchScript, a program that loading runs (torch.jit.load has no safe mode); " \
           "refused, nothing was loaded. If you trust it, add --trust-env-code" in line
    assert loads == []  # the metadata was read from the archive, the program never loaded
    eval_cli.main([str(model), "--episodes", "1", "--trust-env-code", "--no-random-baseline", "--json"])
    assert json.loads(capsys.readouterr().out)["episodes"] == 1 and len(loads) == 1


# --- the allowlist, and a property test over random nested recipes ----------------------------------------------

def test_the_allowlist_is_identified_by_what_a_name_finds():
    assert recipe.code_in_recipe({"wrappers": [{"_target_": "gymnasium.wrappers.common.TimeLimit",  # an alias
                                                "max_episode_steps": 5},
                                               {"_target_": "ppo_cli.wrappers.KeepObservationIndices",
                                                "indices": [0, 2]}],
                                  "id": "ppo_cli.example_envs:MaskedGrid-v0"}) == []
    assert recipe.code_in_recipe({"entry_point": "ppo_cli.example_envs:GoalReach"}) == []
    found = recipe.code_in_recipe({"entry_point": "os:system", "id": "this:CartPole-v1",
                                   "wrappers": [{"_target_": "gymnasium.wrappers.RecordVideo", "video_folder": "/x"},
                                                "not-a-mapping", {"_target_": "\x1b[2Jx" * 40}]})
    assert found[0] == "env.entry_point=os:system (is posix.system, not on the allowlist)"
    assert found[1] == "env.id=this:CartPole-v1 (imports module this)"
    assert found[2].startswith("env.wrappers[0]._target_=gymnasium.wrappers.RecordVideo (is gymnasium.wrappers.")
    assert found[3] == "env.wrappers[1]=not-a-mapping (not a {_target_: ...} mapping)"
    assert "\x1b" not in found[4] and found[4].endswith("... (not on the allowlist)")  # escapes shown, cut short
    # The user's own keys are theirs.
    assert recipe.code_in_recipe({"entry_point": "os:system"}, named=["env.entry_point"]) == []


CALLED: list[str] = []


def _record(name: str):
    def call(*args, **kwargs):
        CALLED.append(name)
        return args[0] if args else kwargs.get("env")
    call.__name__ = call.__qualname__ = name
    return call


@pytest.fixture
def pool_module(tmp_path, monkeypatch):
    """`recipe_pool`: callables that record being called, some reached through attributes; `recipe_pool_lazy`: a
    module on the path, not imported, whose import records itself; a resolver that records its use."""
    import types

    module = types.ModuleType("recipe_pool")
    for name in ("fn", "wrapper_like", "make_env"):
        setattr(module, name, _record(f"recipe_pool.{name}"))
    module.sub = types.SimpleNamespace(deep=_record("recipe_pool.sub.deep"))
    module.np = types.ModuleType("recipe_pool.np")
    module.np.savez = _record("recipe_pool.np.savez")
    monkeypatch.setitem(sys.modules, "recipe_pool", module)
    (tmp_path / "recipe_pool_lazy.py").write_text("from tests.test_file_recipes import CALLED\n"
                                                   "CALLED.append('import recipe_pool_lazy')\nx = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    if not OmegaConf.has_resolver("pool_resolver"):
        OmegaConf.register_new_resolver("pool_resolver", lambda *a: CALLED.append("resolver") or 1)
    CALLED.clear()
    yield
    CALLED.clear()


TARGETS = ["recipe_pool.fn", "recipe_pool:wrapper_like", "recipe_pool.sub.deep", "recipe_pool.np.savez",
           "recipe_pool_lazy.x", "gymnasium.utils.seeding.np.savez", "ppo_cli.envs.recipe.importlib.import_module",
           "builtins.exec", "os.system", "gymnasium.wrappers.TransformReward",
           # allowed ones, some by another name: nested or with Hydra keys they are refused all the same
           "gymnasium.wrappers.TimeLimit", "gymnasium.wrappers.common.TimeLimit", "gymnasium.wrappers.ClipReward",
           "ppo_cli.wrappers.KeepObservationIndices"]
PLAIN = [1, 0.5, "x", None, True, [0, 2], {"a": 1}]


def _random_value(rng: random.Random, depth: int):
    roll = rng.random()
    if depth > 3 or roll < 0.4:
        return rng.choice(PLAIN + ["${pool_resolver:1}", "${oc.env:HOME}"] if rng.random() < 0.2 else PLAIN)
    if roll < 0.7:
        node = {"_target_": rng.choice(TARGETS)}
        for key in rng.sample(["func", "max_episode_steps", "_args_", "_partial_", "indices", "x"], rng.randint(0, 2)):
            node[key] = _random_value(rng, depth + 1)
        return node
    if roll < 0.85:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    return {rng.choice(["a", "b", "_args_", "_target_"]): _random_value(rng, depth + 1)}


def _random_recipe(rng: random.Random) -> dict:
    env: dict = {"id": rng.choice(["CartPole-v1", "CartPole-v1", "recipe_pool_lazy:CartPole-v1",
                                   "ppo_cli.example_envs:MaskedGrid-v0"])}
    if rng.random() < 0.3:
        env["entry_point"] = rng.choice(["recipe_pool:make_env", "recipe_pool_lazy:x",
                                         "ppo_cli.example_envs:MaskedGrid",
                                         "gymnasium.envs.registration:load_env_creator"])
    if rng.random() < 0.4:
        env["kwargs"] = {"k": _random_value(rng, 1)}
    env["wrappers"] = []
    for _ in range(rng.randint(0, 3)):
        wrapper = {"_target_": rng.choice(TARGETS)}
        for key in rng.sample(["max_episode_steps", "indices", "func", "_args_", "_partial_", "min_reward"],
                              rng.randint(0, 2)):
            wrapper[key] = _random_value(rng, 1)
        env["wrappers"].append(wrapper)
    return env


def test_random_nested_recipes_never_call_anything_off_the_allowlist(pool_module):
    """Whatever a file's recipe holds, check() either refuses it or what is then built calls only the allowlist."""
    rng = random.Random(30)
    built = refused = 0
    for case in range(400):
        env = _random_recipe(rng)
        try:
            recipe.check(env, trusted=False, what="checkpoint", source="x.pt", how="--trust-env-code", env_only=True)
        except Exception as exc:  # noqa: BLE001 - the refusal is a UserError; anything else fails below
            assert type(exc).__name__ == "UserError", (case, env, exc)
            refused += 1
            assert CALLED == [], (case, env, CALLED)
            continue
        cfg = OmegaConf.merge(OmegaConf.structured(EnvConfig), env)
        try:
            envs._env_fn(cfg)().close()
            built += 1
        except Exception:  # noqa: BLE001, S110 - an allowed wrapper given wrong plain data fails; that is allowed
            pass
        assert CALLED == [], (case, env, CALLED)
    assert "recipe_pool_lazy" not in sys.modules
    assert refused > 100 and built > 20, (refused, built)  # both sides of the rule were exercised
