"""The reasoning text of Probe-CoT trajectories, composed from the bench's metadata.

A high-resolution trajectory has three phases (the paper's Sec. 3): a *global impression* that picks
regions worth a closer look, *local scrutiny* of each crop, and a *critical check* that weighs what the
crop shows against its pristine surround and the whole scene (bokeh is not blur; grain that runs
through the whole photo is not a local defect; zooming in does not mean something is wrong).

Phrasing comes from a seeded bank of templates, so the same seed gives the same text; how each
defect type looks and what it could be mistaken for are in its registry entry (:mod:`qprobe.defects`). The text only
says what the model can see: the location in words, the extent, the texture, how strong the artefact
looks. It never states hidden numbers (severity levels, MOS, file names or ids).

``brief`` phrasing keeps each phase to one short clause (the decision to crop or not, what a crop shows
and what it is not, the verdict): the embedded default's tiny model has fewer tokens to learn and to
write before its answer, and its long reasoning was where whole rollouts came apart (docs/training.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from qprobe.defects import TYPES

# How strong an artefact looks, by the bench's severity 1-5 (words, never the number).
STRENGTH = {1: "faint", 2: "mild", 3: "clear", 4: "strong", 5: "severe"}

# Every trajectory opens by restating what the prompt says about resolution, so the choice between a
# crop and an answer follows from the model's own words rather than from a prompt far back.
DOWNSCALED = "The view is downscaled {scale:.1f}x from the photo, so fine detail is lost."
NATIVE = "The photo is shown at its native resolution, so the view hides no detail."
NO_CROP = "I can judge it as a whole without cropping."
LOW_RES_DEFECT = "There is {strength} {kind} at the {where}"  # full phrasing adds how it looks

GLOBAL_OPENINGS = [
    "At this scale the photo looks {overall}: exposure and colour are {exposure}, and the composition reads clearly.",
    "The global view shows a {overall} photo with {exposure} exposure and colour.",
    "Seen whole, the photo is {overall}; tones and colour look {exposure}.",
]
# A low-resolution sample has openings of its own: no sentence it shares with a multi-turn trajectory
# stands between the first words and the choice to answer, so a small model never loses the thread.
NATIVE_OPENINGS = [
    "Seen at full size, the photo is {overall}, with {exposure} exposure and colour.",
    "Every pixel is visible here: the photo is {overall} and its tones look {exposure}.",
    "At native size the photo reads as {overall}; exposure and colour are {exposure}.",
]
GLOBAL_LIMITS = [
    "Small local defects would be invisible at this resolution, so I need a closer look at native resolution.",
    "The view is downscaled, which hides fine detail; local artefacts can only be judged up close.",
    "Fine texture is averaged away here, so I will zoom into regions where a local artefact could hide.",
]
GLOBAL_TARGET = [
    "The {texture} area at the {where} is worth checking.",
    "I will inspect the {texture} region at the {where}.",
    "The {where} holds {texture} detail where artefacts would show; I will crop it.",
]
LOCAL_DEFECT = [
    "In the crop, the {texture} area at the {where} shows {strength} {kind}: {look}.",
    "Up close, part of the {where} is degraded: {look}, a {strength} case of {kind}.",
    "The crop reveals {strength} {kind} in the {texture} area at the {where}: {look}.",
]
LOCAL_CLEAN = [
    "The crop shows the {texture} area at the {where} rendered cleanly: crisp edges, no blocking, noise or banding.",
    "At native resolution the {where} is clean: detail is crisp and tones are smooth.",
    "Nothing is wrong in this crop: the {texture} detail at the {where} is sharp and free of artefacts.",
]
CRITICAL_DEFECT = [
    "It could be mistaken for {confound}, so it is a genuine local {kind} defect covering about {extent} of the photo.",
    "Checked against the context: this might pass for {confound}. It is a local {kind} artefact over roughly {extent} of the frame.",
]
CRITICAL_CLEAN = [
    "Zooming in found no defect here; whatever softness or grain the crop has matches the rest of the scene.",
    "The crop agrees with the global view: this region is clean, and any softness is the scene's own depth of field.",
]
# Brief phrasing: one fixed clause per phase, the critical check kept as the confound's head.
BRIEF_TARGET = "I will crop the {where}."
BRIEF_NEXT = "Next, the {where}."
BRIEF_DEFECT = "The crop shows {strength} {kind} at the {where}, not {confound}: a local defect over {extent} of the photo."
BRIEF_CLEAN = "The crop of the {where} is clean; any softness is the scene's own."

VERDICTS = {
    5: "Overall the photo is excellent.",
    4: "Overall the photo is good, with only minor issues.",
    3: "Overall the quality is fair: the defects are noticeable.",
    2: "Overall the quality is poor: the defects are hard to miss.",
    1: "Overall the quality is bad.",
}


def where_in_image(box: Sequence[float], width: int, height: int) -> str:
    """The box's position in words, on a 3x3 grid of the image."""
    cx = (box[0] + box[2]) / 2 / width
    cy = (box[1] + box[3]) / 2 / height
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else ""
    if row and col:
        return f"{row} {col}"
    if row:
        return {"upper": "top", "lower": "bottom"}[row]
    return col or "centre"


def texture_words(level: float) -> str:
    """``level`` in [0, 1]: local detail energy relative to the image's most textured region."""
    return "finely textured" if level > 0.6 else "moderately textured" if level > 0.3 else "smooth"


def extent_words(area_fraction: float) -> str:
    percent = 100 * area_fraction
    return f"{percent:.1f}% " if percent < 1 else f"{percent:.0f}%"


@dataclass(frozen=True)
class CropFacts:
    """What one crop shows, in original pixels: the crop, and the defects inside it (type, severity, box)."""

    box: tuple[int, int, int, int]
    defects: tuple[tuple[str, int, tuple[int, int, int, int]], ...]
    texture: float


def _overall(mos: float) -> tuple[str, str]:
    if mos >= 4.0:
        return "sharp and well exposed", "natural"
    if mos >= 3.0:
        return "reasonably sharp", "balanced"
    return "acceptable at first sight", "plausible"


def global_impression(crop: CropFacts, width: int, height: int, mos: float, scale: float,
                      rng: random.Random, brief: bool = False) -> str:
    """Phase 1: what the view, downscaled ``scale`` times, shows, and why this region deserves a crop."""
    overall, exposure = _overall(mos)
    where = where_in_image(crop.box, width, height)
    if brief:
        return f"{DOWNSCALED.format(scale=scale)} {BRIEF_TARGET.format(where=where)}"
    return " ".join([
        DOWNSCALED.format(scale=scale),
        rng.choice(GLOBAL_OPENINGS).format(overall=overall, exposure=exposure),
        rng.choice(GLOBAL_LIMITS),
        rng.choice(GLOBAL_TARGET).format(texture=texture_words(crop.texture), where=where),
    ])


def next_target(crop: CropFacts, width: int, height: int, rng: random.Random, brief: bool = False) -> str:
    """The bridge from one crop to the next."""
    where = where_in_image(crop.box, width, height)
    if brief:
        return BRIEF_NEXT.format(where=where)
    return rng.choice(["Next I check the {texture} area at the {where}.",
                       "One more region deserves a look: the {where}.",
                       "I also want to see the {texture} detail at the {where}."]).format(
        texture=texture_words(crop.texture), where=where)


def scrutiny(crop: CropFacts, width: int, height: int, rng: random.Random, brief: bool = False) -> str:
    """Phases 2 and 3 for one crop: what it shows, then the critical check against context."""
    texture = texture_words(crop.texture)
    if not crop.defects:
        where = where_in_image(crop.box, width, height)
        if brief:
            return BRIEF_CLEAN.format(where=where)
        return " ".join([rng.choice(LOCAL_CLEAN).format(texture=texture, where=where),
                         rng.choice(CRITICAL_CLEAN)])
    parts = []
    for kind, severity, box in crop.defects:
        where = where_in_image(box, width, height)
        area = (box[2] - box[0]) * (box[3] - box[1]) / (width * height)
        if brief:
            parts.append(BRIEF_DEFECT.format(strength=STRENGTH[int(severity)], kind=kind, where=where,
                                             confound=TYPES[kind].confound.split(",")[0],
                                             extent=extent_words(area).strip()))
            continue
        parts.append(rng.choice(LOCAL_DEFECT).format(
            texture=texture, where=where, strength=STRENGTH[int(severity)], kind=kind, look=rng.choice(TYPES[kind].looks)))
        parts.append(rng.choice(CRITICAL_DEFECT).format(confound=TYPES[kind].confound, kind=kind,
                                                        extent=extent_words(area).strip()))
    return " ".join(parts)


def verdict(mos: float, n_defects: int) -> str:
    text = VERDICTS[min(5, max(1, round(mos)))]
    if n_defects:
        return f"{text} I found {n_defects} local defect{'s' if n_defects > 1 else ''}."
    return f"{text} I found no local defect."


def low_res_impression(mos: float, defects: Sequence[tuple[str, int, Sequence[float]]], width: int, height: int,
                       rng: random.Random, brief: bool = False) -> str:
    """The single turn of a low-resolution sample: judged from the global view alone."""
    overall, exposure = _overall(mos)
    parts = [NATIVE] if brief else [NATIVE, rng.choice(NATIVE_OPENINGS).format(overall=overall, exposure=exposure)]
    parts.append(NO_CROP)
    for kind, severity, box in defects:
        mention = LOW_RES_DEFECT.format(strength=STRENGTH[int(severity)], kind=kind,
                                        where=where_in_image(box, width, height))
        parts.append(f"{mention}." if brief else f"{mention}: {rng.choice(TYPES[kind].looks)}.")
    parts.append(verdict(mos, len(defects)))
    return " ".join(parts)
