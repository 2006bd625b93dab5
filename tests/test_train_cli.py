"""End-to-end `ppo-train` / `ppo-eval` runs: event tags, checkpoint contents, evaluation output."""

import json
import re

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_cli.cli.evaluate import load_policy
from ppo_cli.run import checkpoint

from .conftest import TINY, cli

TAGS = ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clip_fraction",
        "losses/explained_variance", "losses/grad_norm", "charts/episodic_return", "charts/episodic_length",
        "charts/lr_actor", "charts/lr_critic", "charts/ent_coef", "charts/SPS"]


def _events(run_dir):
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_train_writes_every_tag_one_point_per_update(tiny_run):
    acc = _events(tiny_run)
    scalars = acc.Tags()["scalars"]
    for tag in TAGS:
        assert tag in scalars, tag
    steps = [e.step for e in acc.Scalars("losses/policy_loss")]
    assert steps == [128, 256]  # x = environment steps, 2 envs x 64 steps per update
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_checkpoint_is_self_contained(tiny_run):
    data = checkpoint.load(tiny_run / "checkpoints" / "checkpoint.pt")
    assert data["format_version"] == checkpoint.FORMAT_VERSION and data["global_step"] == 256
    assert data["action_space"] == {"type": "Discrete", "n": 2}
    policy, cfg = load_policy(data)
    assert cfg.algo.n_steps == 64 and cfg.env.num_envs == 2
    assert torch.equal(policy.state_dict()["policy_head.weight"], data["policy"]["policy_head.weight"])
    assert "state" in data["optimizer"] and data["env_state"] is not None
    assert not list((tiny_run / "checkpoints").glob("*.tmp"))


def test_summary_and_result_file(tmp_path):
    proc = cli("ppo-train", *TINY, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, check=True)
    assert re.search(r"done: 256 steps in .* SPS\)", proc.stdout)
    assert "checkpoint: " + str(tmp_path / "r" / "checkpoints" / "checkpoint.pt") in proc.stdout
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["global_step"] == 256 and result["final_eval"]["episodes"] == 2


def test_default_run_dir_is_under_runs(tmp_path):
    cli("ppo-train", *TINY, "eval.final=false", "eval.objective=train", cwd=tmp_path, check=True)
    ckpts = list((tmp_path / "runs").glob("*/*/checkpoints/checkpoint.pt"))
    assert len(ckpts) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d", ckpts[0].parents[2].name)


def test_ppo_eval_json_and_text(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    proc = cli("ppo-eval", str(ckpt), "--json", "--episodes", "3", "--seed", "7", cwd=tmp_path, check=True)
    result = json.loads(proc.stdout)  # nothing but one JSON object on stdout
    assert result["episodes"] == 3 and len(result["returns"]) == 3 and result["global_step"] == 256
    assert result["random_mean_return"] > 0 and result["deterministic"] is True
    again = json.loads(cli("ppo-eval", str(ckpt), "--json", "--episodes", "3", "--seed", "7", cwd=tmp_path).stdout)
    assert again["returns"] == result["returns"]  # same seed, same episodes
    text = cli("ppo-eval", str(ckpt), "--stochastic", "--episodes", "2", cwd=tmp_path, check=True).stdout
    assert "stochastic" in text and "random policy:" in text and "(trained 256 steps)" in text


def test_ppo_eval_survives_missing_config_files(tiny_run, tmp_path):
    """The checkpoint alone is enough: delete the run's Hydra record and move the file elsewhere."""
    moved = tmp_path / "elsewhere.pt"
    (tiny_run / "checkpoints" / "checkpoint.pt").rename(moved)
    for f in (tiny_run / ".hydra").iterdir():
        f.unlink()
    proc = cli("ppo-eval", str(moved), "--episodes", "1", cwd=tmp_path, check=True)
    assert "return:" in proc.stdout


def test_ppo_eval_records_one_video_per_episode(tiny_run, tmp_path):
    videos = tmp_path / "videos"
    cli("ppo-eval", str(tiny_run / "checkpoints" / "checkpoint.pt"), "--video", str(videos), "--episodes", "2",
        "--no-random-baseline", cwd=tmp_path, check=True, env={"SDL_VIDEODRIVER": "dummy"})
    files = sorted(p.name for p in videos.glob("*.mp4"))
    assert files == ["eval-episode-1.mp4", "eval-episode-2.mp4"]
    assert all((videos / f).stat().st_size > 1000 for f in files)


# --- progress from the first second (issue 30, item 12) -----------------------------------------------------------

def test_a_long_update_shows_progress_before_it_ends(tmp_path, monkeypatch, capfd):
    """A plain console gets a line while an update's rollout runs, once LIVE_SECONDS passed without one (Atari's
    first update was silent for 38 s)."""
    from ppo_cli.run import logger
    from ppo_cli.run.runner import Runner

    from .conftest import make_cfg

    monkeypatch.setattr(logger, "LIVE_SECONDS", 0.5)
    cfg = make_cfg("env.num_envs=2", "algo.n_steps=12000", "algo.batch_size=24000", "algo.K_epochs=1",
                   "algo.total_timesteps=24000", "fast_rollout=false", "eval.every_steps=0", "eval.final=false",
                   "eval.objective=train", "checkpoint_interval=0")
    trainer = Runner(cfg, tmp_path, rich_progress=False)
    try:
        trainer.run()
    finally:
        trainer.close()
    out = capfd.readouterr().out
    live = re.findall(r"step +([\d,]+)/24,000 \| update 1 collecting \| 0m0\ds into it", out)
    assert live, out
    steps = [int(s.replace(",", "")) for s in live]
    assert steps == sorted(steps) and 0 < steps[0] < 24000  # the envs' steps as they are taken
    assert out.index("update 1 collecting") < out.index("update 1 |")


def test_ppo_eval_hears_of_each_episode_as_it_ends():
    from ppo_cli.cli.evaluate import progress
    from ppo_cli.envs.make import make_vec_env
    from ppo_cli.run.evaluation import evaluate_random, run_episodes

    from .conftest import make_cfg

    envs = make_vec_env(make_cfg().env, seed=0, num_envs=3, step_cap=500)
    heard = []
    result = run_episodes(envs, lambda obs, mask, starts: envs.action_space.sample(), 7, seed=0,
                          on_episode=lambda ret, length: heard.append((ret, length)))
    assert heard == list(zip(result.returns, result.lengths, strict=True)) and len(heard) == 7
    assert evaluate_random(envs, 2, seed=0).returns  # the baseline plays without a listener
    envs.close()
    with progress(7) as tick:  # not a terminal here: the result alone, no bar
        assert tick is None
