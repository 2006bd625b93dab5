"""Bring your own env: module:Id, entry_point and a user preset, trained through the CLI and evaluated."""

import json

import pytest

from .conftest import cli

FAST = ["env.num_envs=4", "algo.n_steps=64", "algo.batch_size=64", "algo.total_timesteps=4096", "algo.K_epochs=4",
        "algo.lr_actor=1e-3", "eval.every_steps=0", "eval.episodes=4"]
OPTIMAL = 1.0 - 4 * 0.01  # five steps right: four step costs, then the goal


def _train_and_eval(tmp_path, *args, flags=()):
    run_dir = tmp_path / "run"
    cli("ppo-train", *flags, *FAST, *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True)
    ckpt = run_dir / "checkpoints" / "checkpoint.pt"
    out = cli("ppo-eval", str(ckpt), "--json", "--episodes", "4", "--trust-env-code", cwd=tmp_path, check=True)
    return json.loads(out.stdout)


def test_module_colon_id(tmp_path):
    result = _train_and_eval(tmp_path, "env.id=tests.custom_env:Corridor-v0")
    assert result["mean_return"] == pytest.approx(OPTIMAL)  # learned to walk straight to the goal
    assert result["random_mean_return"] < OPTIMAL


def test_entry_point_with_kwargs_and_time_limit(tmp_path):
    result = _train_and_eval(tmp_path, "env.entry_point=tests.custom_env:Corridor", "env.kwargs.length=3",
                             "env.max_episode_steps=30")
    assert result["mean_return"] == pytest.approx(1.0 - 2 * 0.01)


def test_user_preset_from_own_config_dir(tmp_path):
    conf = tmp_path / "my_conf" / "env"
    conf.mkdir(parents=True)
    (conf / "my_corridor.yaml").write_text("entry_point: tests.custom_env:Corridor\nkwargs: {length: 4}\n"
                                           "max_episode_steps: 30\nnum_envs: 4\n")
    result = _train_and_eval(tmp_path, "env=my_corridor", flags=("--config-dir", str(tmp_path / "my_conf")))
    assert result["mean_return"] == pytest.approx(1.0 - 3 * 0.01)


def test_wrappers_are_instantiated_in_order(tmp_path):
    wrappers = "env.wrappers=[{_target_: gymnasium.wrappers.TimeLimit, max_episode_steps: 3}]"
    result = _train_and_eval(tmp_path, "env.id=tests.custom_env:Corridor-v0", wrappers)
    assert result["mean_length"] <= 3  # the user's TimeLimit(3) cuts every episode before the goal


def test_unimportable_module_names_it(tmp_path):
    for arg in ("env.id=no_such_pkg.envs:Warehouse-v0", "env.entry_point=no_such_pkg.envs:WarehouseEnv"):
        proc = cli("ppo-train", arg, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "cannot import module 'no_such_pkg.envs'" in proc.stderr and "PYTHONPATH" in proc.stderr


def test_env_check_passes_and_fails_clearly(tmp_path):
    ok = cli("ppo-train", *FAST, "algo.total_timesteps=256", "env.entry_point=tests.custom_env:Corridor",
             "env.check=true", f"hydra.run.dir={tmp_path / 'ok'}", cwd=tmp_path, check=True)
    assert "passes gymnasium's env checker" in ok.stdout
    bad = cli("ppo-train", "env.entry_point=tests.custom_env:BrokenCorridor", "env.check=true",
              f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "fails gymnasium's env checker" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_eval_says_which_module_to_make_importable(tmp_path):
    run_dir = tmp_path / "run"
    cli("ppo-train", *FAST, "algo.total_timesteps=256", "env.entry_point=tests.custom_env:Corridor",
        f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True)
    proc = cli("ppo-eval", str(run_dir / "checkpoints" / "checkpoint.pt"), "--trust-env-code", cwd=tmp_path,
               env={"PYTHONPATH": ""})
    assert proc.returncode == 2 and "cannot import module 'tests.custom_env'" in proc.stderr


def test_video_of_an_env_that_cannot_render_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    cli("ppo-train", *FAST, "algo.total_timesteps=256", "env.entry_point=tests.custom_env:NoDisplay",
        "eval.final=false", "eval.objective=train", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True)
    proc = cli("ppo-eval", str(run_dir / "checkpoints" / "checkpoint.pt"), "--video", str(tmp_path / "v"),
               "--episodes", "1", "--trust-env-code", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("ppo-eval: error:")]
    assert len(errors) == 1 and "could not render (RuntimeError: no OpenGL context on this machine)" in errors[0]
