"""A defect type is one registry entry plus its degradation: a new one flows everywhere types are used."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qprobe import defects
from qprobe.agent import protocol
from qprobe.bench import degradations
from qprobe.bench.config import BenchConfig
from qprobe.bench.contact_sheet import make_contact_sheet
from qprobe.bench.outputs import BenchOut
from qprobe.bench.synthesize import synthesize
from qprobe.defects import DefectType
from qprobe.trajectories import composer

FOG = DefectType("fog", visibility=0.6, colour=(200, 0, 200), looks=("a milky veil over the detail",),
                 confound="haze in the scene, but it stops at a sharp line while the distance does not change")
FOG_ANSWER = protocol.render_turn("hazy", protocol.render_answer(2.5, [protocol.Defect((1, 1, 9, 9), "fog")]))


def fog_degradation(patch: np.ndarray, severity: int, rng: np.random.Generator, origin: tuple[int, int]) -> np.ndarray:
    """A veil: pixels pulled towards light grey, more with severity."""
    weight = 0.15 * severity
    return patch * (1 - weight) + 200.0 * weight


@pytest.fixture
def fog(monkeypatch: pytest.MonkeyPatch) -> DefectType:
    """The fake type ``fog`` registered for one test: its entry and its degradation function."""
    monkeypatch.setitem(defects.TYPES, FOG.name, FOG)
    monkeypatch.setitem(degradations.DEGRADATIONS, FOG.name, fog_degradation)
    return FOG


def test_an_unregistered_type_is_refused_by_the_strict_format_check() -> None:
    failure = protocol.format_failure(FOG_ANSWER)
    assert failure is not None and failure.kind is protocol.FailureKind.UNKNOWN_DEFECT_TYPE
    assert "fog" not in protocol.system_prompt()


def test_a_registered_type_reaches_the_prompt_the_format_check_the_phrasing_and_the_colour(fog) -> None:
    assert "banding, fog" in protocol.system_prompt()  # both lists of types in the prompt, registry order
    assert protocol.system_prompt().count("fog") == 2
    assert protocol.format_failure(FOG_ANSWER) is None
    crop = composer.CropFacts(box=(0, 0, 100, 100), defects=(("fog", 3, (10, 10, 60, 60)),), texture=0.5)
    text = composer.scrutiny(crop, 400, 300, random.Random(0))
    assert "a clear case of fog" in text and FOG.looks[0] in text and FOG.confound in text
    low = composer.low_res_impression(2.5, [("fog", 5, (10, 10, 60, 60))], 400, 300, random.Random(0))
    assert f"severe fog at the upper left: {FOG.looks[0]}." in low
    assert defects.colour("fog") == FOG.colour


def test_the_contact_sheet_draws_a_registered_type_in_its_colour(fog, tmp_path: Path) -> None:
    Image.new("RGB", (400, 300), (128, 128, 128)).save(tmp_path / "flat.png")
    record = {"id": "flat", "image": "flat.png", "width": 400, "height": 300, "mos": 3.0,
              "defects": [{"type": "fog", "severity": 2, "bbox": [40, 100, 360, 280]}]}
    sheet = np.asarray(Image.open(make_contact_sheet([record], BenchOut(str(tmp_path)), "sheet.jpg")), dtype=float)
    edge = sheet[6 + 223: 6 + 225, 6 + 40: 6 + 280].mean(axis=(0, 1))  # bottom edge (y 224 at 0.8 scale), 2 px
    nearest = min(defects.TYPES.values(), key=lambda t: np.abs(edge - t.colour).sum())
    assert nearest is FOG, edge


def test_a_registered_type_with_its_degradation_is_synthesised_and_scored(fog, tmp_path: Path, tiny_photos) -> None:
    cfg = BenchConfig(source=str(tiny_photos), out=str(tmp_path / "bench"), metrics=str(tmp_path / "bench.json"),
                      num_images=4, min_size=200, pristine_fraction=0.0, types=["fog"], contact_sheet_size=4)
    result = synthesize(cfg, progress=False)  # the manifest's validation accepts the new type
    found = [d for r in result.records for d in r["defects"]]
    assert found and {d["type"] for d in found} == {"fog"}
    assert all(r["mos"] < 4.8 for r in result.records)
    assert json.loads((tmp_path / "bench.json").read_text())["defects_by_type"]["fog"] == len(found)


def test_a_degradation_for_an_unregistered_type_is_refused() -> None:
    with pytest.raises(KeyError, match=r"'fog' has no entry in qprobe\.defects\.TYPES"):
        degradations.register("fog")
