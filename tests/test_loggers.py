"""--train.loggers: TensorBoard and W&B (offline) receive the same metrics, hyperparameters and samples as
metrics.jsonl, checked by reading their files back with each tool's own reader."""

import json

import pytest

from gptforge.common import UserError
from gptforge.config import TrainConfig
from gptforge.train.loggers import RunLoggers, scalar_params

RECORDS = [{"step": 1, "loss": 4.5, "lr": 1e-3, "tokens": 512},
           {"step": 10, "loss": 3.25, "lr": 2e-3, "tokens": 5120},
           {"step": 10, "val_loss": 3.5, "elapsed_s": 1.5},
           {"step": 10, "sample": "ROMEO:\nhello <world>"}]
PARAMS = {"train": {"lr": 2e-3, "max_steps": 10, "eval_tasks": []}, "model": {"n_layer": 2}}


def test_jsonl_is_always_written_and_unknown_loggers_refused(tmp_path):
    loggers = RunLoggers(tmp_path, ["jsonl"], PARAMS)
    for r in RECORDS:
        loggers.write(r)
    loggers.close()
    assert loggers.read() == RECORDS and not loggers.others
    with pytest.raises(UserError, match="unknown logger 'mlflow'; choose from jsonl, tensorboard, wandb"):
        TrainConfig(loggers=["jsonl", "mlflow"]).validate()
    assert scalar_params(PARAMS) == {"train.lr": 2e-3, "train.max_steps": 10, "train.eval_tasks": "[]", "model.n_layer": 2}


def test_tensorboard_events_hold_the_same_metrics_hparams_and_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = RunLoggers(tmp_path, ["jsonl", "tensorboard"], PARAMS)
    for r in RECORDS:
        loggers.write(r)
    loggers.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 4.5), (10, 3.25)]
    assert [(e.step, e.value) for e in acc.Scalars("val_loss")] == [(10, 3.5)]
    assert [e.step for e in acc.Scalars("tokens")] == [1, 10]
    [sample] = acc.Tensors("sample/text_summary")
    assert sample.step == 10 and "hello <world>" in sample.tensor_proto.string_val[0].decode()
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["train.lr"].number_value == 2e-3 and start.hparams["model.n_layer"].number_value == 2


@pytest.mark.slow  # W&B starts its service process: several seconds
def test_wandb_offline_run_files_hold_the_same_metrics_config_and_samples(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                       "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "myrun"
    run_dir.mkdir()
    loggers = RunLoggers(run_dir, ["wandb"], PARAMS)
    for r in RECORDS:
        loggers.write(r)
    loggers.close()
    [offline] = (run_dir / "wandb").glob("offline-run-*")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert offline.name.endswith(run_id)
    wandb.teardown()  # what the end of the process does: the service finishes writing the run file
    history, config = read_wandb_records(offline / f"run-{run_id}.wandb")
    assert config["train"]["lr"] == 2e-3 and config["model"]["n_layer"] == 2
    by_step = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    assert by_step[1]["loss"] == 4.5 and by_step[10]["loss"] == 3.25 and by_step[10]["val_loss"] == 3.5
    assert by_step[10]["sample/_type"] == "html-file"  # the sample, written as a file beside the run
    html = next((offline / "files").rglob("*.html")).read_text()
    assert "hello &lt;world&gt;" in html
    # resuming logs into the same W&B run
    again = RunLoggers(run_dir, ["wandb"], PARAMS)
    again.write({"step": 11, "loss": 3.0})
    again.close()
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    assert all(p.name.endswith(run_id) for p in (run_dir / "wandb").glob("offline-run-*"))


def read_wandb_records(path):
    """History rows and the config of an offline W&B run file, decoded with wandb's own protobuf messages.
    The file is a 7-byte header (":W&B", an id, a version) then LevelDB-log framing: 32 KiB blocks of
    [crc32 (4) | length (2, little-endian) | kind (1: whole, 2: first, 3: middle, 4: last)] + payload."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pending, payloads = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little left in this block for a header: padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            payloads.append(pending)
            pending = b""
    history, config = [], {}
    for payload in payloads:
        record = wandb_internal_pb2.Record.FromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            for item in items:
                value = json.loads(item.value_json)
                config[item.key] = value.get("value", value) if isinstance(value, dict) else value
    return history, config
