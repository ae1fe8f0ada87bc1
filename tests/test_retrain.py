"""Scheduled retraining: the promotion rule, the model registry, and the flow for real."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from repo_copy import copy_repo

from flows.retrain import retrain
from qprobe import tracking
from tasks.dvc_stage import lock_entry
from tasks.registry import decide


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "promote", "reason"),
    [
        (0.80, None, 0.01, True, "no champion yet"),
        (0.80, 0.70, 0.01, True, "beats champion by +0.1000"),
        (0.705, 0.70, 0.01, False, "below the margin"),
        (0.71, 0.70, 0.01, True, "beats champion"),  # exactly the margin wins
        (None, 0.70, 0.01, False, "no score"),
        (math.nan, None, 0.01, False, "no score"),
        (0.5, math.nan, 0.01, True, "no champion yet"),
    ],
)
def test_promotion_rule(challenger, champion, margin, promote, reason) -> None:
    decision = decide(challenger, champion, margin)
    assert decision.promote is promote and reason in decision.reason


def test_registry_round_trip(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    assert tracking.model_version("champion", root=tmp_path) is None
    first = tracking.register_model(model, alias="challenger", tags={"pipeline_run": "abc"}, root=tmp_path)
    tracking.set_alias("champion", first, root=tmp_path)
    (model / "config.json").write_text('{"model_type": "qwen2_5_vl", "v": 2}')
    second = tracking.register_model(model, alias="challenger", root=tmp_path)
    assert (first, second) == ("1", "2")
    champion = tracking.model_version("champion", root=tmp_path)
    assert str(champion.version) == "1" and champion.tags["pipeline_run"] == "abc"
    assert str(tracking.model_version("challenger", root=tmp_path).version) == "2"
    # The registry holds its own copy: the champion survives the workspace folder changing.
    folder = tracking.download_version(champion, tmp_path / "dl")
    assert (folder / "config.json").read_text() == '{"model_type": "qwen2_5_vl"}'
    assert champion.tags["model.md5"] != tracking.model_version("challenger", root=tmp_path).tags["model.md5"]


# --- the flow for real: S3 (SeaweedFS) -> DVC data version -> pipeline -> registry decision ----------

EVAL_ARGS = ["--limit", "2", "--split", "all", "--baselines", "[]", "--bootstrap", "0", "--max-new-tokens", "8",
             "--crop-bias-images", "0", "--repeat-images", "0", "--bokeh-dir", "null"]


@pytest.fixture(scope="module")
def retrain_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The random base model never answers, so the decision rides on its answer rate (0.0, a number).
    return copy_repo(tmp_path_factory.mktemp("retrain"), {
        "bench": {"num_images": 5, "workers": 1, "contact_sheet_size": 0, "min_size": 200},  # tiny_photos: 320 px
        "retrain": {"model": "models/base", "metric": "bench.qprobe.answer_rate", "stages": ["bench", "model"],
                    "evaluate_args": EVAL_ARGS},
    })


@pytest.fixture
def incoming(aws_env: dict[str, str], tiny_photos: Path) -> str:
    from qprobe import storage

    bucket = f"incoming-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    for photo in sorted(p for p in tiny_photos.rglob("*") if p.is_file()):
        storage.upload_file(photo, f"s3://{bucket}/new/{photo.name}")
    return f"s3://{bucket}/new/"


@pytest.mark.slow
def test_retrain_promotes_first_then_keeps_the_champion(retrain_repo: Path, incoming: str,
                                                         prefect_harness: None, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{retrain_repo / 'mlflow.db'}")
    first = retrain(incoming=incoming, root=str(retrain_repo))
    assert first["promoted"] and first["reason"] == "no champion yet"
    # The pulled photos are a DVC data version, and the bench ran on exactly that version.
    photos = retrain_repo / "data" / "photos"
    assert len(list(photos.iterdir())) == 5 and (retrain_repo / "data" / "photos.dvc").is_file()
    params = yaml.safe_load((retrain_repo / "params.yaml").read_text())["bench"]
    assert params["source"] == "data/photos" and params["source_version"] == first["data_version"]
    assert lock_entry(retrain_repo, "bench")["params"]["params.yaml"]["bench"]["source_version"] == first["data_version"]
    assert str(tracking.model_version("champion", root=retrain_repo).version) == first["challenger"]

    # Nothing new arrives: the pipeline is cached, the same model ties, and the champion stays.
    second = retrain(incoming=incoming, root=str(retrain_repo))
    assert not second["promoted"] and "below the margin" in second["reason"]
    assert second["data_version"] is None
    assert str(tracking.model_version("champion", root=retrain_repo).version) == first["challenger"]
    assert str(tracking.model_version("challenger", root=retrain_repo).version) == second["challenger"]
    runs = mlflow.search_runs(filter_string="tags.`qprobe.stage` = 'retrain'", search_all_experiments=True,
                              output_format="list", order_by=["attributes.start_time ASC"])
    assert [r.data.tags["decision"] for r in runs] == ["promoted", "kept"]


@pytest.mark.slow
def test_deployment_is_registered_and_one_run_is_triggered(retrain_repo: Path, prefect_harness: None,
                                                           monkeypatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{retrain_repo / 'mlflow.db'}")
    pool = f"qprobe-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    flow_from_repo = retrain.from_source(source=str(retrain_repo), entrypoint="flows/retrain.py:retrain")
    deployment_id = flow_from_repo.deploy(name="weekly", work_pool_name=pool, cron="0 3 * * 1",
                                          parameters={"root": str(retrain_repo)}, build=False, push=False,
                                          print_next_steps=False)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
        assert deployment.schedules[0].schedule.cron == "0 3 * * 1"
    flow_run = run_deployment(deployment_id, timeout=0)
    asyncio.run(ProcessWorker(work_pool_name=pool).start(run_once=True))
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run.id).state
    assert state.is_completed(), state
