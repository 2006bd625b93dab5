"""Experiment trackers (run/trackers.py, issue 34 item 1), real runs, no mocks: MLflow against a local SQLite store
read back through MLflow's client, W&B offline read back from its run files; each gets the scalars TensorBoard
gets at the same steps, and a resume continues the same tracker run. A tracker that is not installed is one line
and the run goes on, or stops with logger.strict=true."""

import json
import struct

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import ROOT, cli

RUN = ["algo.total_timesteps=1024", "env.num_envs=2", "algo.n_steps=128", "algo.batch_size=64",
       "eval.every_steps=512", "eval.episodes=2", "checkpoint_interval=1"]
TAGS = ("losses/value_loss", "losses/entropy", "charts/SPS", "eval/mean_return")


def _tensorboard(run):
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS}


def test_mlflow_gets_every_scalar_at_its_step_and_a_resume_continues_the_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    args = ["logger.backends=[tensorboard,mlflow]", f"logger.mlflow.tracking_uri={uri}"]
    cli("ppo-train", *RUN, *args, f"hydra.run.dir={run}", cwd=tmp_path, check=True)
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["id"]
    client = mlflow.MlflowClient(uri)

    def history(tag):
        return [(m.step, pytest.approx(m.value, rel=1e-6)) for m in client.get_metric_history(run_id, tag)]

    board = _tensorboard(run)
    for tag in TAGS:
        assert history(tag) == board[tag] and board[tag], tag
    got = client.get_run(run_id)
    assert got.data.params["algo.clip_range"] == "0.1" and got.data.tags["env"] == "CartPole-v1"
    assert got.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} >= {"checkpoints/checkpoint.pt"}
    assert "result.json" in {a.path for a in client.list_artifacts(run_id)}
    cli("ppo-train", f"resume={run / 'checkpoints' / 'checkpoint.pt'}", "algo.total_timesteps=2048", cwd=tmp_path,
        check=True)
    saved = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert saved == {"id": run_id, "step": 2048, "uri": uri}
    steps = [s for s, _ in history("losses/value_loss")]
    assert steps == [256 * k for k in range(1, 9)]  # the same run: 4 updates, then 4 more after the resume
    assert client.get_run(run_id).info.status == "FINISHED"


def _wandb_history(run):
    """The history rows of every W&B offline run file under the run folder, read as W&B writes them: a
    LevelDB-style log of 32 KiB blocks, each record a protobuf Record (wandb.proto)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = {}
    for path in sorted((run / "wandb").glob("offline-run-*/*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if not length and not kind:
                break
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            pending = chunk if kind in (1, 2) else pending + chunk
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                if record.WhichOneof("record_type") == "history":
                    row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                    rows.setdefault(row["_step"], {}).update(row)
    return rows


def test_wandb_offline_gets_every_scalar_at_its_step_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    cli("ppo-train", *RUN, "logger.backends=[tensorboard,wandb]", f"hydra.run.dir={run}", cwd=tmp_path, check=True,
        env=env)
    run_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    rows = _wandb_history(run)
    board = _tensorboard(run)
    for tag in TAGS:
        assert [(step, pytest.approx(row[tag], rel=1e-6)) for step, row in sorted(rows.items()) if tag in row] == (
            board[tag]), tag
    cli("ppo-train", f"resume={run / 'checkpoints' / 'checkpoint.pt'}", "algo.total_timesteps=2048", cwd=tmp_path,
        check=True, env=env)
    assert json.loads((run / "trackers.json").read_text())["wandb"]["id"] == run_id
    files = sorted((run / "wandb").glob("offline-run-*"))
    assert len(files) == 2 and all(f.name.split("-")[-2 if f.name.endswith("-1") else -1] == run_id for f in files)
    assert sorted(s for s, row in _wandb_history(run).items() if "losses/value_loss" in row) == [
        256 * k for k in range(1, 9)]


@pytest.mark.parametrize("strict", [False, True])
def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, strict):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    run = tmp_path / "run"
    proc = cli("ppo-train", *RUN, "logger.backends=[tensorboard,wandb]", f"logger.strict={str(strict).lower()}",
               f"hydra.run.dir={run}", cwd=tmp_path, env={"PYTHONPATH": f"{shim}:{ROOT}"})
    if strict:
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0] == ('ppo-train: error: logger.backends: wandb is not installed (pip install ".[wandb]") '
                            '(logger.strict=true)')
    else:
        assert proc.returncode == 0, proc.stderr
        assert ('warning: logger.backends: wandb is not installed (pip install ".[wandb]"); training goes on without '
                'it (logger.strict=true stops instead)') in proc.stdout
        assert json.loads((run / "result.json").read_text())["status"] == "ok"


def test_a_resume_from_before_the_trackers_last_step_starts_a_new_tracker_run(tmp_path, monkeypatch):
    """A tracker cannot take steps back: resuming from an earlier checkpoint than its last step gives a new run
    (with a note), never the same steps twice in one run; a resume from where it stopped continues it. The store
    named relative to the working folder is found again from anywhere (trackers.json keeps it absolute)."""
    pytest.importorskip("mlflow")
    from omegaconf import OmegaConf

    from ppo_cli.run import trackers

    from .conftest import make_cfg

    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("logger.backends=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=sqlite:///m.db")
    said = []
    first = trackers.open_trackers(cfg.logger, tmp_path, cfg, None, said.append)
    first[0].scalars(1024, {"a": 1.0})
    trackers.save_ids(tmp_path, first)
    first[0].close([], failed=False)
    saved = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert saved["uri"] == f"sqlite:///{tmp_path / 'm.db'}" and saved["step"] == 1024
    monkeypatch.chdir(tmp_path.parent)  # a resume started elsewhere
    again = trackers.open_trackers(cfg.logger, tmp_path, cfg, 1024, said.append)
    assert again[0].run_id == saved["id"] and said == []
    again[0].close([], failed=True)
    rewound = trackers.open_trackers(cfg.logger, tmp_path, cfg, 512, said.append)
    assert rewound[0].run_id != saved["id"]
    assert said == [f"note: this run resumes at step 512, before step 1,024 that its mlflow run {saved['id']} reached: "
                    f"a new mlflow run continues it, so no step is logged twice"]
    assert rewound[0].client.get_run(saved["id"]).info.status == "FAILED"
    assert OmegaConf.select(cfg, "logger.mlflow.tracking_uri") == "sqlite:///m.db"


def test_a_tracking_server_that_does_not_answer_is_one_line_at_once(tmp_path):
    """MLflow's client would retry a silent server for minutes, printing each retry; one request tells."""
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    proc = cli("ppo-train", *RUN, "logger.backends=[tensorboard,mlflow]", "logger.mlflow.tracking_uri=http://127.0.0.1:9",
               f"hydra.run.dir={run}", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning: logger.backends")]
    assert warnings == ["warning: logger.backends: mlflow could not start a run (ConnectionError: http://127.0.0.1:9 "
                        "does not answer ([Errno 111] Connection refused)); training goes on without it "
                        "(logger.strict=true stops instead)"]
