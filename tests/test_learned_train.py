"""`sollol train` on synthetic histories: refusal, artifact contents, MAPE, time windows."""

import json
from datetime import UTC, datetime

import numpy as np
import pytest
import sklearn
from threadpoolctl import threadpool_limits

from sollol.cli import main
from sollol.errors import ModelArtifactError, TrainingDataError
from sollol.history import create_history_engine
from sollol.learning.artifact import load_artifact, save_artifact
from sollol.learning.features import FEATURE_NAMES, FEATURE_SCHEMA_VERSION, read_feature_table
from sollol.learning.synthetic import EPOCH_S, SYNTHETIC_NODES, write_synthetic_history
from sollol.learning.train import TrainParams, train_from_history

FAST = TrainParams(max_trees=20, min_rows=200)


@pytest.fixture(autouse=True)
def one_openmp_thread():
    # Spinning OpenMP threads slow fitting several-fold on a busy 2-core machine.
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


@pytest.fixture
def history_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'history.db'}"
    engine = create_history_engine(url)
    write_synthetic_history(engine, 3000, seed=1)
    engine.dispose()
    return url


def test_too_little_history_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'small.db'}"
    engine = create_history_engine(url)
    write_synthetic_history(engine, 150)
    engine.dispose()
    with pytest.raises(TrainingDataError, match="not enough history to train: 150 usable rows"):
        train_from_history(url, tmp_path / "model.json", params=FAST)
    assert not (tmp_path / "model.json").exists()


def test_missing_table_is_refused(tmp_path):
    with pytest.raises(TrainingDataError, match="no 'requests' table"):
        train_from_history(f"sqlite:///{tmp_path / 'empty.db'}", tmp_path / "m.json")


def test_artifact_contents(history_url, tmp_path):
    out = tmp_path / "model.json"
    train_from_history(history_url, out, params=FAST)
    document = json.loads(out.read_text())
    assert document["format"] == "sollol-latency-model"
    assert document["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    assert document["features"] == list(FEATURE_NAMES)
    assert document["sklearn_version"] == sklearn.__version__
    assert document["nodes"] == sorted(SYNTHETIC_NODES)
    assert document["models"] == ["large", "small"]
    span = document["data_span"]
    assert span["rows"] == 3000
    assert span["first"] == datetime.fromtimestamp(EPOCH_S, UTC).isoformat()
    assert span["holdout_rows"] == 600
    assert len(document["targets"]["latency_ms"]["roots"]) == 20
    assert document["targets"]["ttft_ms"] is not None


def test_mape_reported_per_node(history_url, tmp_path):
    model = train_from_history(history_url, tmp_path / "model.json", params=FAST)
    metrics = model.info["metrics"]["latency_ms"]
    assert metrics["holdout_rows"] == 600
    assert metrics["train_rows"] == 2400
    assert set(metrics["per_node"]) == set(SYNTHETIC_NODES)
    assert sum(node["holdout_rows"] for node in metrics["per_node"].values()) == 600
    # The synthetic law has 10% noise and a reply length only bounded by
    # max_tokens, so 20 trees land well below a 60% error but not near zero.
    assert 0.05 < metrics["mape"] < 0.6
    for node in metrics["per_node"].values():
        assert 0.0 < node["mape"] < 1.0


def test_trained_model_ranks_nodes_by_speed(history_url, tmp_path):
    model = train_from_history(history_url, tmp_path / "model.json", params=FAST)
    table = read_feature_table(history_url)
    from sollol.learning._forest_py import predict_raw

    # Each node's typical row (its own moving averages), with one request and load.
    common = np.nanmedian(table.features, axis=0)
    rows = np.array(
        [np.nanmedian(table.features[table.features[:, 0] == code], axis=0) for code in range(4)]
    )
    rows[:, 1:6] = common[1:6]
    out = np.empty(len(rows))
    forest = model.latency
    predict_raw(
        forest.baseline, forest.roots, forest.feature, forest.threshold, forest.left,
        forest.right, forest.missing_left, forest.value, rows, out,
    )  # fmt: skip
    predicted = dict(zip(model.node_names, np.exp(out), strict=True))
    assert predicted["fast-gpu"] < predicted["slow-gpu"] < predicted["small-cpu"]


def test_time_window_limits_rows(history_url):
    # Synthetic rows start 0.05 s apart from EPOCH_S.
    since = datetime.fromtimestamp(EPOCH_S + 50.0, UTC)
    until = datetime.fromtimestamp(EPOCH_S + 100.0, UTC)
    table = read_feature_table(history_url, since=since, until=until)
    assert table.rows == 1000
    assert table.started_at.min() >= EPOCH_S + 50.0
    assert table.started_at.max() < EPOCH_S + 100.0


def test_failed_and_featureless_rows_are_left_out(tmp_path):
    from sqlalchemy import update

    from sollol.history import requests_table

    url = f"sqlite:///{tmp_path / 'history.db'}"
    engine = create_history_engine(url)
    write_synthetic_history(engine, 100)
    with engine.begin() as connection:
        connection.execute(
            update(requests_table).where(requests_table.c.id <= 10).values(outcome="error")
        )
        connection.execute(
            update(requests_table)
            .where(requests_table.c.id.between(11, 15))
            .values(est_prompt_tokens=None)
        )
    engine.dispose()
    assert read_feature_table(url).rows == 85


def test_incompatible_artifact_is_rejected(history_url, tmp_path):
    out = tmp_path / "model.json"
    save_artifact(train_from_history(history_url, out, params=FAST), out)
    document = json.loads(out.read_text())
    document["feature_schema_version"] = FEATURE_SCHEMA_VERSION + 1
    out.write_text(json.dumps(document))
    with pytest.raises(ModelArtifactError, match="feature schema"):
        load_artifact(out)
    out.write_text("{not json")
    with pytest.raises(ModelArtifactError, match="not valid JSON"):
        load_artifact(out)


def test_cli_train_refuses_and_succeeds(history_url, tmp_path, capsys):
    out = tmp_path / "cli-model.json"
    status = main(["train", "--database-url", history_url, "--out", str(out), "--trees", "5"])
    captured = capsys.readouterr()
    assert status == 0
    assert out.exists()
    assert "held-out MAPE" in captured.err
    assert f"wrote {out}" in captured.out

    empty = f"sqlite:///{tmp_path / 'none.db'}"
    assert main(["train", "--database-url", empty, "--out", str(out)]) == 1
    assert "sollol train:" in capsys.readouterr().err
