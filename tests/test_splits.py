"""The one split rule (:mod:`qprobe.data.splits`) that the bench and the public importers share."""

from __future__ import annotations

from qprobe.data.splits import assign_splits

BENCH = {"train": 0.7, "val": 0.15, "test": 0.15}


def test_splits_are_by_photo_deterministic_and_never_empty():
    keys = [f"p{i}" for i in range(7)]
    splits = assign_splits(keys, BENCH, seed=0)
    assert sorted(splits.values()).count("train") == 5 and set(splits.values()) == {"train", "val", "test"}
    assert splits == assign_splits(list(reversed(keys)), BENCH, seed=0)
    big = assign_splits([f"p{i}" for i in range(1000)], {"train": 0.8, "test": 0.2}, seed=3)
    assert sorted(big.values()).count("test") == 200


def test_embedded_default_split_is_unchanged():
    # params.yaml bench: the 14 bundled skimage scenes, seed 0; recorded before the bench's and the
    # importers' rules became one, so the embedded default's manifest keeps its splits.
    keys = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
            "gravel.png", "hubble_deep_field.png", "immunohistochemistry.png", "moon.png", "motorcycle.png",
            "retina.png", "rocket.png"]
    splits = assign_splits(keys, BENCH, seed=0)
    assert {k for k, s in splits.items() if s == "val"} == {"moon.png", "coins.png"}
    assert {k for k, s in splits.items() if s == "test"} == {"camera.png", "rocket.png"}
    assert len(splits) == 14


def test_fewer_sources_than_splits_still_train_on_one():
    # Rounding alone would send the one source to val (its share rounds up first).
    assert assign_splits(["a"], {"train": 0.1, "val": 0.45, "test": 0.45}, seed=0) == {"a": "train"}
    two = assign_splits(["a", "b"], {"train": 0.1, "val": 0.45, "test": 0.45}, seed=0)
    assert sorted(two.values()).count("train") == 1
    assert assign_splits([], BENCH, seed=0) == {}
