"""Shared fixtures. Telemetry is off for every test: these machines have no internet."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_services import services_config, stop_and_check

from qprobe import offline
from qprobe.ops import services as S

offline.apply()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for every flow test of the session (10-40 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own MLflow store unless it sets one itself: never the repo's mlflow.db.

    ``mlflow.set_tracking_uri`` (an earlier test's, or a stage run in this process) outranks the
    environment for this process's client, while a stage in a subprocess follows the environment: point
    the client back at this test's store, or a test would read another test's runs.
    """
    import mlflow

    if "MLFLOW_TRACKING_URI" not in os.environ:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    # ``mlflow.set_experiment`` keeps the experiment's id in a global and in os.environ: in another
    # test's store that id names nothing (or another experiment).
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.tracking.fluent._active_experiment_id = None


@pytest.fixture
def photos_dir() -> Path:
    """The real high-resolution photos (``$QPROBE_PHOTOS``, 2000-3000 px); skips the test when unset or missing."""
    folder = os.environ.get("QPROBE_PHOTOS")
    if not folder or not Path(folder).is_dir():
        pytest.skip("QPROBE_PHOTOS is not set to a folder of photos")
    return Path(folder)


@functools.lru_cache(maxsize=1)
def _tiny_photo_arrays() -> dict[str, object]:
    """Small crops of scikit-image's bundled photos: real content (texture, flat areas, edges). Read-only."""
    import numpy as np
    from skimage import data

    return {
        "people/astronaut.jpg": data.astronaut()[40:280, 80:400],
        "coffee.png": data.coffee()[40:280, 100:420],
        "animals/cat.jpg": data.chelsea()[20:260, 60:380],
        "rocket.png": data.rocket()[80:320, 160:480],
        "motorcycle.jpg": np.ascontiguousarray(data.stereo_motorcycle()[0][100:340, 200:520]),
    }


@pytest.fixture
def tiny_photos(tmp_path: Path) -> Path:
    """A folder (with a subfolder) of five 320x240 real photos as JPEG and PNG; returns the folder."""
    from PIL import Image

    root = tmp_path / "photos"
    for name, pixels in _tiny_photo_arrays().items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=92)
    return root


@pytest.fixture
def awkward_images(tmp_path: Path) -> dict[str, Path]:
    """Files an image loader must survive, by name; all 320x240 photos unless the name says otherwise.

    ``truncated`` (JPEG cut in half), ``empty`` (0 bytes), ``text`` (a text file named .jpg) are
    unreadable; ``deep16`` (16-bit greyscale PNG), ``cmyk`` (CMYK JPEG), ``alpha`` (RGBA PNG, left half
    transparent) and ``rotated`` (EXIF orientation 6: shown 240x320) load; ``large`` is 800x600 and
    ``small`` 120x90, for tests of pixel and size limits.
    """
    import io

    import numpy as np
    from PIL import Image

    photo = _tiny_photo_arrays()["people/astronaut.jpg"]
    folder = tmp_path / "awkward"
    folder.mkdir()
    paths = {}

    def save(name: str, image: Image.Image, **kwargs: object) -> None:
        paths[name.split(".")[0]] = folder / name
        image.save(folder / name, **kwargs)

    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a photo\n")
    paths.update(truncated=folder / "truncated.jpg", empty=folder / "empty.jpg", text=folder / "text.jpg")
    grey = (photo.astype(np.float64) @ [0.299, 0.587, 0.114]).round().astype(np.uint16) * 257
    save("deep16.png", Image.fromarray(grey))
    save("cmyk.jpg", Image.fromarray(photo).convert("CMYK"), quality=92)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:, : photo.shape[1] // 2, 3] = 0
    save("alpha.png", Image.fromarray(rgba, mode="RGBA"))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save("rotated.jpg", Image.fromarray(photo), exif=exif, quality=92)
    save("large.png", Image.fromarray(photo).resize((800, 600)))
    save("small.jpg", Image.fromarray(photo).resize((120, 90)), quality=92)
    return paths


# --- agent runtime: the tiny Qwen2.5-VL, random and taught the protocol ------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2.5-VL of `qprobe model init-tiny` (seed 0), built once per session."""
    from qprobe.models.tiny import build_tiny

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny(out, seed=0)
    return out


@dataclasses.dataclass(frozen=True)
class TaughtModel:
    """A tiny model taught one protocol conversation, and what it was taught."""

    path: Path
    image_path: Path
    global_max_pixels: int
    crop_max_pixels: int
    max_crops: int
    call_box: tuple[int, int, int, int]  # view pixels
    score: float
    defect_box: tuple[int, int, int, int]  # view pixels
    defect_type: str

    def flags(self) -> list[str]:
        return ["--global-max-pixels", str(self.global_max_pixels), "--crop-max-pixels", str(self.crop_max_pixels),
                "--max-crops", str(self.max_crops), "--max-new-tokens", "200"]


@pytest.fixture(scope="session")
def taught_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TaughtModel:
    """The tiny model after 200 steps of plain-torch SFT on one conversation through the tool path.

    The random model rarely emits a tag; this one, greedy on the same photo and budgets, calls the
    crop tool with ``call_box``, then answers ``score`` with one defect: a real rollout through every
    turn. The loss is masked to the assistant turns by the chat template's generation markers, as
    trl's ``assistant_only_loss`` does it.
    """
    import numpy as np
    import torch
    from PIL import Image

    from qprobe.agent import protocol
    from qprobe.agent.crop import CropTool, global_view
    from qprobe.models.factory import load_model

    folder = tmp_path_factory.mktemp("taught")
    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.stack([xx * 255 // 639, yy * 255 // 479, ((xx // 40 + yy // 40) % 2) * 200], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    image.save(folder / "photo.png")
    taught = TaughtModel(path=folder / "model", image_path=folder / "photo.png", global_max_pixels=112 * 112,
                         crop_max_pixels=112 * 112, max_crops=2, call_box=(28, 14, 84, 70), score=3.75,
                         defect_box=(30, 20, 60, 50), defect_type="blur")
    view, _ = global_view(image, taught.global_max_pixels)
    tool = CropTool(image, taught.global_max_pixels, taught.crop_max_pixels, max_calls=taught.max_crops)
    messages = [
        *protocol.global_turn(view, image.size, taught.max_crops),
        protocol.assistant_turn(protocol.render_turn("The global view looks smooth; check the upper left.",
                                                     protocol.render_tool_call(taught.call_box))),
        protocol.tool_turn(tool.crop(list(taught.call_box))),
        protocol.assistant_turn(protocol.render_turn("The crop is soft against sharp surroundings.",
                                                     protocol.render_answer(taught.score, [protocol.Defect(
                                                         taught.defect_box, taught.defect_type)]))),
    ]
    torch.manual_seed(0)
    model, processor = load_model(tiny_model_dir, device="cpu")
    batch = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                          return_assistant_tokens_mask=True)
    labels = batch["input_ids"].clone()
    labels[batch.pop("assistant_masks") == 0] = -100
    # 120 steps left one of the 106 taught tokens wrong on some CPUs (float rounding differs by machine):
    # 200 reach a loss under 0.01 with every token right, and the check below says so if one is not.
    steps = 200
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small is several times slower on two busy threads
    try:
        for _ in range(steps):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
        model.eval()
        with torch.no_grad():
            predicted = model(**batch).logits[0, :-1].argmax(-1)
    finally:
        torch.set_num_threads(threads)
    target = labels[0, 1:]
    wrong = int((predicted[target != -100] != target[target != -100]).sum())
    assert wrong == 0, f"the taught model got {wrong} of its {int((target != -100).sum())} taught tokens wrong"
    model.save_pretrained(taught.path)
    processor.save_pretrained(taught.path)
    return taught



# --- local services (SeaweedFS S3, MLflow server): one set for the whole session --------------------


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S.ServicesConfig]:
    """One SeaweedFS for the session; the MLflow fixture adds its server to the same folder."""
    cfg = services_config(tmp_path_factory.mktemp("services"), "s3")
    S.start_services(cfg)
    yield cfg
    stop_and_check(cfg)


@pytest.fixture(scope="session")
def mlflow_server(s3: S.ServicesConfig) -> S.ServicesConfig:
    """The session's services with an MLflow server too: `up` keeps the healthy S3 and adds MLflow."""
    cfg = dataclasses.replace(s3, roles="s3,mlflow")
    S.start_services(cfg)
    return cfg


@pytest.fixture
def aws_env(s3: S.ServicesConfig, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The services' variables in this process, as `source .services/env` sets them in a shell."""
    from qprobe import storage

    env = S.service_env(s3)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    storage.client.cache_clear()
    yield env
    storage.client.cache_clear()
