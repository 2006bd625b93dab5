"""ppo-eval's side of issue 19: a file's env recipe runs no code without the user's word (1), faults get one line
(12), evaluation has a step cap and says what it cut (13), the env scored is the env named (17), --video is quiet
and says where the files went (22)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ppo_cli.cli import evaluate as eval_cli
from ppo_cli.cli import export as export_cli
from ppo_cli.cli import sweep_report
from ppo_cli.errors import UserError, one_line_errors

from .conftest import ROOT, TINY, cli

NEVER = "tests.custom_env:NeverEnds"


def _crafted(ckpt: Path, out: Path, **changes) -> Path:
    """A copy of `ckpt` with its config YAML edited (`yaml=[(old, new), ...]`) or other entries replaced."""
    data = torch.load(ckpt, weights_only=True)
    text = data["config_yaml"]
    for old, new in changes.pop("yaml", []):
        assert old in text, old
        text = text.replace(old, new)
    torch.save({**data, "config_yaml": text, **changes}, out)
    return out


def _with_nan(ckpt: Path) -> dict:
    policy = torch.load(ckpt, weights_only=True)["policy"]
    policy["actor_encoder.0.weight"][0, 0] = float("nan")
    return policy


def _popen(marker: Path) -> list[tuple[str, str]]:
    return [("entry_point: null", "entry_point: subprocess:Popen"),
            ("kwargs: {}", f"kwargs: {{args: ['touch', '{marker}']}}")]


def _wrapper(marker: Path) -> list[tuple[str, str]]:
    return [("wrappers: []", f"wrappers: [{{_target_: subprocess.Popen, args: ['touch', '{marker}']}}]")]


def _evil_module(tmp: Path, marker: Path, monkeypatch) -> None:
    """A module whose import alone creates the marker (a `module:Id` env id imports it)."""
    (tmp / "evil_env_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp))


def _exported(ckpt: Path, out: Path, capsys) -> Path:
    # Writing it runs no env code; the recipe is copied on the user's word (ppo-export refuses it otherwise).
    export_cli.main([str(ckpt), "--format", "onnx", "--out", str(out), "--trust-env-code"])
    capsys.readouterr()
    return out


# Each row: (the argv after the file, given ckpt / tmp / marker), the fragment the one line must hold.
# The file is the tiny CartPole run's checkpoint unless the row crafts one.
ROWS = {
    # item 1: the env recipe would import or call code
    "entry-point": (lambda c, t, m, mp, cs: [_crafted(c, t / "evil.pt", yaml=_popen(m))],
                    "the checkpoint's env recipe would import or call code: env.entry_point=subprocess:Popen (is "
                    "subprocess.Popen, not on the allowlist); refused, nothing was run. If you trust "),
    "module-id": (lambda c, t, m, mp, cs: (_evil_module(t, m, mp), [_crafted(
                      c, t / "evil.pt", yaml=[("id: CartPole-v1", "id: evil_env_module:Evil-v0")])])[1],
                  "would import or call code: env.id=evil_env_module:Evil-v0 (imports module evil_env_module)"),
    "wrapper-target": (lambda c, t, m, mp, cs: [_crafted(c, t / "evil.pt", yaml=_wrapper(m))],
                       "would import or call code: env.wrappers[0]._target_=subprocess.Popen (is subprocess.Popen, "
                       "not on the allowlist)"),
    "--env-does-not-vouch-for-wrappers": (
        lambda c, t, m, mp, cs: [_crafted(c, t / "evil.pt", yaml=_wrapper(m)), "--env", "CartPole-v1"],
        "env.wrappers[0]._target_=subprocess.Popen"),
    "exported-model": (lambda c, t, m, mp, cs: [_exported(_crafted(c, t / "evil.pt", yaml=_popen(m)),
                                                          t / "evil.onnx", cs)],
                       "the model's env recipe would import or call code: env.entry_point=subprocess:Popen"),
    # item 12
    "seed-negative": (lambda c, t, m, mp, cs: [c, "--seed", "-1"], "--seed=-1: must be >= 0"),
    "seed-not-a-number": (lambda c, t, m, mp, cs: [c, "--seed", "abc"],
                          "argument --seed: invalid int value: 'abc' (see ppo-eval --help)"),
    "tampered-space": (lambda c, t, m, mp, cs: [_crafted(c, t / "t.pt", observation_space={"type": "Box"})],
                       "the checkpoint's space description is damaged (KeyError: 'shape'"),
    "tampered-space-value": (lambda c, t, m, mp, cs: [_crafted(c, t / "t.pt",
                                                               action_space={"type": "Discrete", "n": "two"})],
                             "the checkpoint's space description is damaged (ValueError"),
    "video-folder": (lambda c, t, m, mp, cs: [c, "--video", str(t / "afile" / "videos")],
                     "--video {tmp}/afile/videos: cannot create the folder (Not a directory)"),
    # item 13
    "max-steps-zero": (lambda c, t, m, mp, cs: [c, "--max-episode-steps", "0"], "--max-episode-steps=0: must be >= 1"),
    "checkpoint-cap-zero": (lambda c, t, m, mp, cs: [_crafted(c, t / "z.pt", yaml=[("max_episode_steps: 108000",
                                                                                   "max_episode_steps: 0")])],
                            "eval.max_episode_steps=0: must be >= 1 (set --max-episode-steps N)"),
    # issue 30, items 11 and 12
    "policy-is-a-string": (lambda c, t, m, mp, cs: [_crafted(c, t / "s.pt", policy="weights")],
                           "the checkpoint's policy entry is a str, not a mapping of tensors: the file is damaged"),
    "format-version-a-string": (lambda c, t, m, mp, cs: [_crafted(c, t / "v.pt", format_version="2")],
                                "has format version '2', not a whole number: the file is damaged or was not "
                                "written by ppo-cli"),
    "nan-weights": (lambda c, t, m, mp, cs: [_crafted(c, t / "n.pt", policy=_with_nan(c))],
                    "the checkpoint's weights hold NaN or inf (actor_encoder.0.weight): the run diverged before "
                    "this checkpoint was written; evaluate an earlier one (best.pt)"),
    # held before, kept held
    "missing": (lambda c, t, m, mp, cs: [t / "none.pt"], "does not exist"),
    "episodes-zero": (lambda c, t, m, mp, cs: [c, "--episodes", "0"], "--episodes=0: must be >= 1"),
    "other-spaces": (lambda c, t, m, mp, cs: [c, "--env", "Acrobot-v1"],
                     "env 'Acrobot-v1' has spaces {'type': 'Box', 'shape': [6]}"),
}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", list(ROWS))
def test_ppo_eval_faults_are_one_line_exit_2(row, tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SDL_VIDEODRIVER", raising=False)  # --video sets it; it goes back after the test
    (tmp_path / "afile").write_text("")
    marker = tmp_path / "pwned"
    make, fragment = ROWS[row]
    argv = [str(a) for a in make(tiny_run / "checkpoints" / "checkpoint.pt", tmp_path, marker, monkeypatch, capsys)]
    before = _digest(tmp_path)
    with pytest.raises(SystemExit) as stop:
        eval_cli.main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ppo-eval: error: ") and fragment.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    if "would import or call code" in fragment:  # the refusal names the file and the flag
        assert f"If you trust {argv[0]}, add --trust-env-code" in lines[0]
    assert not marker.exists()  # no code ran
    assert _digest(tmp_path) == before  # every file as it was (nothing written, nothing half-written)


@pytest.mark.parametrize(("main", "argv", "said"), [
    (export_cli.main, ["x.pt", "--opset", "17"], "ppo-export: error: unrecognized arguments: --opset 17 (see "),
    (export_cli.main, [], "ppo-export: error: the following arguments are required: checkpoint (see ppo-export"),
    (sweep_report.main, ["multirun", "--bogus"], "ppo-sweep-report: error: unrecognized arguments: --bogus (see "),
])
def test_argument_errors_of_every_tool_are_one_line(main, argv, said, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith(said), err


def test_one_line_errors_joins_a_multi_line_message(capsys):
    with pytest.raises(SystemExit) as stop, one_line_errors("ppo-x"):
        raise UserError("the env failed (ValueError: first\n  second line)\n")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "ppo-x: error: the env failed (ValueError: first second line)\n"


# --- a run on an env that never ends: the step cap (13), trust on the command line (1), labels (17) ------------

@pytest.fixture(scope="module")
def never_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny run on NeverEnds with evaluation capped at 30 steps: periodic at 128 and 256, and final."""
    base = tmp_path_factory.mktemp("never")
    proc = cli("ppo-train", *TINY, f"env.entry_point={NEVER}", "eval.every_steps=128", "eval.max_episode_steps=30",
               f"hydra.run.dir={base / 'run'}", cwd=base, check=True, timeout=120)
    return base / "run", proc.stdout


def test_training_evaluations_cut_endless_episodes_and_say_so(never_run):
    run, stdout = never_run
    note = "2 of 2 episodes reached the step cap of 30 steps and were cut (their returns are partial; " \
           "eval.max_episode_steps sets the cap)"
    assert f"eval @ 128: {note}" in stdout and stdout.count(f"eval @ 256: {note}") == 1, stdout  # once per evaluation
    result = json.loads((run / "result.json").read_text())
    assert result["final_eval"]["cut_episodes"] == 2 and result["final_eval"]["mean_length"] == 30
    assert result["final_eval"]["mean_return"] == 30.0  # the partial return: 1 a step
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/cut_episodes")] == [(128, 2.0), (256, 2.0)]


def _eval(capsys, *argv: str) -> str:
    eval_cli.main([*argv])
    out, err = capsys.readouterr()
    assert err == "", err
    return out


def test_ppo_eval_cuts_endless_episodes_trusts_only_the_command_line_and_names_the_env(never_run, capsys):
    run, _ = never_run
    ckpt = str(run / "checkpoints" / "checkpoint.pt")
    # The recipe names user code: refused without the user's word, and nothing imported.
    with pytest.raises(SystemExit) as stop:
        eval_cli.main([ckpt])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert f"env.entry_point={NEVER} (" in err  # "(is tests.custom_env.NeverEnds, " where already imported
    assert f"not on the allowlist); refused, nothing was run. If you trust {ckpt}, add --trust-env-code" in err
    # With it: the checkpoint's cap (30) cuts every episode, the random baseline's too, and the JSON says so.
    result = json.loads(_eval(capsys, ckpt, "--trust-env-code", "--episodes", "3", "--json"))
    assert result["env_id"] == NEVER  # the env scored, not the id left at its default (item 17)
    assert result["cut_episodes"] == 3
    assert result["returns"] == [30.0, 30.0, 30.0] and result["mean_length"] == 30
    assert result["max_episode_steps"] == 30 and result["random_cut_episodes"] == 3
    # --max-episode-steps overrides the checkpoint's cap; the text says how many were cut and by what.
    text = _eval(capsys, ckpt, "--trust-env-code", "--episodes", "3", "--max-episode-steps", "7")
    assert f"env:          {NEVER}, 3 episodes" in text
    assert "mean length:  7.0" in text
    assert ("cut:          3 of 3 episodes reached the step cap of 7 steps and were cut (their returns are partial; "
            "--max-episode-steps sets the cap)") in text
    assert "(same seeds; 3 cut at 7 steps)" in text
    # --env names the env on the command line: no flag needed, and that env is the one scored and named. CartPole
    # ends within 500 steps, so under a cap of 1,000 nothing is cut (NeverEnds would be).
    result = json.loads(_eval(capsys, ckpt, "--env", "CartPole-v1", "--episodes", "3", "--max-episode-steps",
                              "1000", "--no-random-baseline", "--json"))
    assert result["env_id"] == "CartPole-v1" and result["cut_episodes"] == 0 and result["mean_length"] < 500


def test_the_hint_after_a_run_on_the_users_own_env_carries_the_flag_ppo_eval_will_ask_for(never_run):
    run, stdout = never_run
    assert f"evaluate:   ppo-eval {run / 'checkpoints' / 'checkpoint.pt'} --trust-env-code" in stdout


def test_exported_model_is_labelled_and_capped(never_run, tiny_run, tmp_path, capsys):
    run, _ = never_run
    model = _exported(run / "checkpoints" / "checkpoint.pt", tmp_path / "never.onnx", capsys)
    with pytest.raises(SystemExit):
        eval_cli.main([str(model)])
    assert "the model's env recipe would import or call code" in capsys.readouterr().err
    result = json.loads(_eval(capsys, str(model), "--trust-env-code", "--episodes", "2", "--max-episode-steps",
                              "5", "--no-random-baseline", "--json"))
    assert result["env_id"] == NEVER and result["cut_episodes"] == 2 and result["mean_length"] == 5
    # The model's JSON carries the env, not the run's eval settings: the default cap, and a registered id passes.
    model = _exported(tiny_run / "checkpoints" / "checkpoint.pt", tmp_path / "cartpole.onnx", capsys)
    result = json.loads(_eval(capsys, str(model), "--episodes", "1", "--no-random-baseline", "--json"))
    assert result["max_episode_steps"] == 108_000 and result["cut_episodes"] == 0


# --- --video (22) -------------------------------------------------------------------------------------------------

def test_video_is_quiet_and_says_where_the_files_went(tiny_run, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "eval-episode-1.mp4").write_bytes(b"old")  # an earlier recording of the same name
    env = {k: v for k, v in os.environ.items() if k not in ("SDL_VIDEODRIVER", "XDG_RUNTIME_DIR")}
    env.update(PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")  # warnings shown, as a user sees them
    ckpt = tiny_run / "checkpoints" / "checkpoint.pt"
    proc = subprocess.run([sys.executable, "-m", "ppo_cli.cli.evaluate", str(ckpt), "--video", str(videos),
                           "--episodes", "2", "--no-random-baseline"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "Overwriting existing videos" warning, no SDL "XDG_RUNTIME_DIR" error
    assert (f"videos:       2 mp4 files in {videos} (eval-episode-1.mp4 to eval-episode-2.mp4; 1 earlier file of "
            f"these names replaced)") in proc.stdout
    assert sorted(p.name for p in videos.iterdir()) == ["eval-episode-1.mp4", "eval-episode-2.mp4"]
    assert (videos / "eval-episode-1.mp4").stat().st_size > 1000  # the new recording, not the old bytes
