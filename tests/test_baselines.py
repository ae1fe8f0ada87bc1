"""PIQE against a plain per-block transcription of the published algorithm and on real degradations;
SSIM against scikit-image's; the agent scorer with and without its tool."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fixtures_eval import ScriptedBackend
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter
from skimage import data

from qprobe.agent.rollout import RolloutConfig
from qprobe.eval import baselines
from qprobe.eval.baselines import (
    AgentScorer,
    PiqeScorer,
    Prediction,
    SsimScorer,
    luminance,
    piqe,
    piqe_blocks,
    piqe_tiles,
    piqe_to_mos,
    ssim,
    ssim_map,
)


def _piqe_loop(image: Image.Image) -> float:
    """PIQE written the way the paper and MATLAB's piqe describe it: one block at a time."""
    gray = luminance(image)
    h, w = gray.shape
    gray = np.pad(gray, ((0, -h % 16), (0, -w % 16)), mode="symmetric")
    mu = gaussian_filter(gray, 7 / 6, mode="nearest", truncate=3 / (7 / 6))
    sigma = np.sqrt(np.abs(gaussian_filter(gray**2, 7 / 6, mode="nearest", truncate=3 / (7 / 6)) - mu**2))
    mscn = (gray - mu) / (sigma + 1)
    total, active = 0.0, 0
    for i in range(0, mscn.shape[0], 16):
        for j in range(0, mscn.shape[1], 16):
            block = mscn[i:i + 16, j:j + 16]
            v = block.var(ddof=1)
            if v <= 0.1:
                continue
            active += 1
            edges = [block[0, :], block[:, 15], block[15, :], block[:, 0]]
            impaired = any(edge[k:k + 6].std(ddof=1) < 0.1 for edge in edges for k in range(11))
            centre = np.concatenate([block[:, 7], block[:, 8]])
            surround = np.delete(block, [7, 8], axis=1)
            ratio = centre.std(ddof=1) / surround.std(ddof=1)
            ratio = 0.0 if math.isnan(ratio) else ratio
            beta = abs(math.sqrt(v) - ratio) / max(math.sqrt(v), ratio)
            noisy = math.sqrt(v) > 2 * beta
            total += impaired * (1 - v) + noisy * v
    return 100 * (total + 1) / (active + 1)


def _noisy(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64)
    pixels = pixels + np.random.default_rng(seed).normal(0, sigma, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def _centre(photo: Path, side: int = 1024) -> Image.Image:
    image = Image.open(photo).convert("RGB")
    w, h = image.size
    return image.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2))


@pytest.mark.parametrize("size", [(160, 128), (150, 101)])  # a multiple of 16, and one that needs padding
def test_piqe_matches_the_per_block_algorithm(size: tuple[int, int]) -> None:
    image = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    noisy = _noisy(image, 12)
    for img in (image, noisy, image.filter(ImageFilter.GaussianBlur(1.5))):
        assert piqe(img) == pytest.approx(_piqe_loop(img), rel=1e-9)


def test_piqe_range_and_mapping() -> None:
    assert piqe(Image.new("RGB", (64, 64), (90, 120, 30))) == 100.0  # uniform: no active block
    assert 0 < piqe(Image.fromarray(data.coffee())) < 100
    assert piqe_to_mos(0) == 5.0 and piqe_to_mos(50) == 3.0 and piqe_to_mos(100) == 1.0
    assert piqe_to_mos(130) == 1.0  # the published pooling can pass 100; the scale stays 1-5


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_piqe_ranks_pristine_above_increasing_blur(name: str) -> None:
    image = Image.fromarray(getattr(data, name)())
    scores = [piqe(image)] + [piqe(image.filter(ImageFilter.GaussianBlur(s))) for s in (1, 2, 4)]
    assert scores == sorted(scores) and scores[0] < scores[-1], scores


@pytest.mark.parametrize("photo", ["plasma-ColorfulCups.jpg", "lxqt-fog.jpg"])
def test_piqe_ranks_a_real_photo_above_its_blurred_and_noisy_versions(photos_dir: Path, photo: str) -> None:
    # Native-resolution 1024 px centres of photos in focus throughout. (On photos with large smooth or
    # bokeh areas, mild noise can *lower* PIQE: it activates flat blocks; see qprobe.eval.baselines.)
    image = _centre(photos_dir / photo)
    pristine = piqe(image)
    blurred = [piqe(image.filter(ImageFilter.GaussianBlur(s))) for s in (1, 2, 4)]
    noisy = [piqe(_noisy(image, s)) for s in (5, 10, 20)]
    assert pristine < blurred[0] < blurred[1] <= blurred[2], blurred
    assert pristine < noisy[0] < noisy[1] < noisy[2], noisy
    patch = PiqeScorer("patch", tile=256)
    assert patch(image).score > patch(image.filter(ImageFilter.GaussianBlur(2))).score
    assert patch(image).score > patch(_noisy(image, 10)).score


def test_patch_probe_finds_a_local_noise_tile() -> None:
    base = Image.fromarray(data.coffee())  # 600x400, native
    box = (256, 0, 384, 128)
    damaged = base.copy()
    damaged.paste(_noisy(base.crop(box), 40, seed=1), box[:2])
    probe = PiqeScorer("patch", tile=128, worst=1)
    clean, found = probe(base), probe(damaged)
    assert found.defects == [{"type": "noise", "bbox": list(box)}]
    assert found.score < clean.score
    # Global PIQE dilutes the same local damage over the whole photo.
    assert abs(piqe(damaged) - piqe(base)) < abs(found.raw - clean.raw)


def test_patch_probe_does_not_rank_featureless_tiles() -> None:
    # Left half textured, right half flat: a flat tile would score 100 if it were ranked.
    texture = Image.fromarray(data.astronaut()).resize((512, 512))
    image = Image.new("RGB", (1024, 512), (128, 128, 128))
    image.paste(texture, (0, 0))
    tiles = piqe_tiles(piqe_blocks(image), tile=256)
    assert tiles and all(t.box[2] <= 512 for t in tiles)
    flat = PiqeScorer("patch", tile=256)(Image.new("RGB", (512, 512), (10, 200, 10)))
    assert flat.raw == 100.0 and flat.defects == []  # no tile to rank: judged as a whole


def test_piqe_scorers_share_each_photos_blocks_and_never_another_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    computed: list[tuple[int, int]] = []

    def counted(image: Image.Image) -> baselines.PiqeBlocks:
        computed.append(image.size)
        return piqe_blocks(image)

    monkeypatch.setattr(baselines, "piqe_blocks", counted)
    monkeypatch.setattr(baselines, "_BLOCKS", OrderedDict())  # whatever earlier tests scored
    photo = Image.fromarray(data.astronaut()).resize((160, 128))
    # Same size and mode, other pixels: a cache keyed by anything but the pixels would mix them up.
    photos = [photo, _noisy(photo, 20), photo.filter(ImageFilter.GaussianBlur(2)), _noisy(photo, 20, seed=1)]
    scorers = [PiqeScorer("global"), PiqeScorer("patch", tile=64)]
    for image in photos + photos[::-1]:
        for scorer in scorers:
            got = scorer(image)
            alone = piqe_blocks(image)
            want = alone.score() if scorer.mode == "global" else np.mean(
                [t.piqe for t in piqe_tiles(alone, 64)[: scorer.worst]])
            assert got.raw == pytest.approx(want, rel=1e-12)
            assert got.cost["seconds"] > 0
    assert len(computed) == len(photos)  # once per photo, whichever scorer asked first
    edited = photos[0].copy()
    edited.paste((0, 0, 0), (0, 0, 48, 48))  # an image edited in place is a new image
    assert piqe(edited) != piqe(photos[0])
    assert scorers[0](edited).raw == pytest.approx(piqe(edited), rel=1e-12)


def test_piqe_scorer_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="mode"):
        PiqeScorer("local")
    with pytest.raises(ValueError, match="tile"):
        PiqeScorer("patch", tile=8)


def test_agent_scorer_with_and_without_the_tool() -> None:
    image = Image.fromarray(data.coffee())
    config = RolloutConfig(global_max_pixels=112 * 112, crop_max_pixels=112 * 112, max_crops=3, max_new_tokens=200)
    with_tool = AgentScorer(ScriptedBackend(), config)(image)
    assert with_tool.score is not None and with_tool.outcome == "answer"
    assert with_tool.cost["crops"] == 1 and with_tool.cost["turns"] == 2 and len(with_tool.crops) == 1
    assert with_tool.cost["crop_visual_tokens"] > 0
    assert with_tool.defects[0]["type"] == "blur" and len(with_tool.defects[0]["bbox"]) == 4
    # The tool disabled: the crop request is refused, the model answers from the global view alone.
    config_off = replace(config, max_crops=0)
    without = AgentScorer(ScriptedBackend(), config_off, name="no_tool")(image)
    assert without.score is not None and without.cost["crops"] == 0 and without.crops == []
    assert without.cost["visual_tokens"] == without.cost["global_visual_tokens"]
    assert 0 < without.cost["visual_ratio"] < with_tool.cost["visual_ratio"]


def test_agent_scorer_survives_the_random_tiny_model(tiny_model_dir: Path) -> None:
    from qprobe.agent.backends import TransformersBackend

    config = RolloutConfig(global_max_pixels=112 * 112, crop_max_pixels=112 * 112, max_crops=0, max_new_tokens=8)
    prediction = AgentScorer(TransformersBackend(str(tiny_model_dir)), config)(Image.fromarray(data.chelsea()))
    assert prediction.score is None and prediction.failure is not None
    assert prediction.cost["generated_tokens"] <= 8 and prediction.trace is not None


def test_ssim_map_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    photo = data.astronaut()
    noisy = np.asarray(_noisy(Image.fromarray(photo), 12.0))
    _, expected = structural_similarity(luminance(noisy), luminance(photo), gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=255, full=True)
    np.testing.assert_allclose(ssim_map(noisy, photo), expected, atol=1e-3)
    assert ssim(photo, photo) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="one size, got 512x512 and 256x512"):
        ssim(photo, photo[:, :256])


def _blurred_square(photo: np.ndarray, side: int, radius: float) -> Image.Image:
    image = Image.fromarray(photo)
    box = (100, 100, 100 + side, 100 + side)
    image.paste(image.crop(box).filter(ImageFilter.GaussianBlur(radius)), box[:2])
    return image


def test_ssim_scorer_ranks_a_local_defect_by_area_and_strength(tmp_path: Path) -> None:
    photo = data.astronaut()
    original = tmp_path / "original.png"
    Image.fromarray(photo).save(original)
    scorer = SsimScorer()
    same = scorer(Image.fromarray(photo), reference=original)
    assert same.raw == pytest.approx(1.0, abs=1e-6) and same.score == pytest.approx(5.0, abs=1e-5)
    scores = [scorer(_blurred_square(photo, side, radius), reference=original).score
              for side, radius in ((40, 1.0), (40, 3.0), (160, 3.0), (300, 3.0))]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert all(1.0 <= s < 5.0 for s in scores)


def test_ssim_scorer_without_a_usable_original_gives_no_score_and_says_why(tmp_path: Path) -> None:
    photo = Image.fromarray(data.astronaut())
    scorer = SsimScorer()
    assert scorer(photo) == Prediction(score=None, outcome="no_reference")
    missing = scorer(photo, reference=tmp_path / "gone.png")
    assert missing.score is None and missing.outcome == "error" and str(tmp_path / "gone.png") in missing.error
    small = tmp_path / "small.png"
    photo.resize((256, 256)).save(small)
    other = scorer(photo, reference=small)
    assert other.outcome == "error" and other.error == f"{small} (the original): SSIM needs images of one size, got 512x512 and 256x256"


def test_ssim_scorer_reads_an_original_rewritten_since(tmp_path: Path) -> None:
    photo = data.astronaut()
    original = tmp_path / "original.png"
    Image.fromarray(photo).save(original)
    scorer = SsimScorer()
    assert scorer(Image.fromarray(photo), reference=original).raw == pytest.approx(1.0, abs=1e-6)
    Image.fromarray(photo[::-1].copy()).save(original)  # the same size, other pixels
    os.utime(original, ns=(original.stat().st_atime_ns, original.stat().st_mtime_ns + 1_000_000))
    assert scorer(Image.fromarray(photo), reference=original).raw < 0.5


def test_ssim_runs_at_native_resolution(photos_dir: Path) -> None:
    photo = Image.open(photos_dir / "plasma-ColorfulCups.jpg").convert("RGB")
    assert photo.size == (2560, 1600)
    # An 8x8 change in a 4-megapixel photo is seen; a downscale would average it away.
    changed = np.asarray(photo).copy()
    changed[800:808, 1200:1208] = 255 - changed[800:808, 1200:1208]
    blurred = photo.filter(ImageFilter.GaussianBlur(2))
    assert 0 < ssim(blurred, photo) < ssim(changed, photo) < 1
