"""PPO with the source table's defaults learns CartPole-v1: deterministic mean return >= 475 over 20 episodes.

The run evaluates every 16,384 steps and stops at the threshold (eval.stop_at_return), so this is also the
stop-at-threshold test. Measured first reaching >= 475 at 82k-115k steps over seeds 1-4 (about 15-25 s here).
"""

import json

from ppo_cli.run import checkpoint

from .conftest import cli


def test_cartpole_defaults_reach_475_and_stop_there(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("ppo-train", "algo.total_timesteps=400000", "eval.every_steps=16384", "eval.episodes=20",
               "eval.stop_at_return=475", f"hydra.run.dir={run_dir}", cwd=tmp_path, check=True, timeout=600)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["stopped_at_step"] is not None and result["stopped_at_step"] < 400000, proc.stdout
    assert result["final_eval"]["episodes"] == 20
    assert result["final_eval"]["mean_return"] >= 475
    assert result["best_eval"]["mean_return"] >= 475
    assert "stopped early: eval.stop_at_return reached at step" in proc.stdout
    final = checkpoint.load(run_dir / "checkpoints" / "checkpoint.pt")
    assert final["global_step"] == result["stopped_at_step"]
