"""The defect types: one registry entry per type, the one place a type is defined.

An entry holds everything the project says about a type: its name (what the bench writes in the
manifest and what the protocol's prompt and strict format check accept), its MOS visibility weight
(:mod:`qprobe.bench.mos`), the trajectory composer's phrasing of it, and its colour in drawings.
Its degradation function lives with the other pixel code in :mod:`qprobe.bench.degradations`,
registered under the entry's name (a test fails when a type has none).

Adding a type is one :class:`DefectType` in :data:`TYPES` plus its degradation function. The order
of :data:`TYPES` is the order the prompt lists the types in (so reordering it changes the prompt).

This module imports nothing heavy: the protocol reads it, and ``qprobe score --help`` must stay fast.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from qprobe.errors import QProbeError

RGB = tuple[int, int, int]

# The colour of a type the registry does not know (a model may write any type in its answer).
UNKNOWN_COLOUR: RGB = (255, 255, 255)


@dataclass(frozen=True)
class DefectType:
    """One defect type and all that is said about it."""

    name: str  # in the manifest, the prompt, answers and trajectories
    visibility: float  # MOS weight w_k in (0, 1]: how much a defect of this type lowers perceived quality
    colour: RGB  # its boxes in the contact sheet, the report, the samples page and `score --viz`
    looks: tuple[str, ...]  # composer: how the artefact looks in a crop (one picked per mention)
    confound: str  # composer: what it could be mistaken for, and why the surround rules that out


TYPES: dict[str, DefectType] = {t.name: t for t in (
    DefectType(
        "blur", visibility=0.85, colour=(0, 170, 255),
        looks=("edges smeared and fine texture washed out", "detail dissolved into a soft smear",
               "lost micro-contrast, the texture reduced to a soft wash"),
        confound="shallow depth of field, but the pixels right around it, at the same distance, stay sharp"),
    DefectType(
        "noise", visibility=0.75, colour=(255, 215, 0),
        looks=("a grainy speckle laid over the texture", "random luminance and colour speckle",
               "a noisy, sandpaper-like grain that is not in the rest of the scene"),
        confound="natural grain or sensor noise, but it stops at a boundary while the rest of the photo is clean"),
    DefectType(
        "jpeg", visibility=0.9, colour=(255, 60, 60),
        looks=("8x8 blocking and mosquito noise around edges", "blocky compression artefacts with ragged edges",
               "visible block boundaries and smeared chroma typical of heavy compression"),
        confound="a regular texture, but the grid aligns with nothing in the scene and ends abruptly"),
    DefectType(
        "ringing", visibility=0.7, colour=(255, 80, 200),
        looks=("halos and overshoot along edges", "bright and dark ripples echoing each edge",
               "over-sharpened edges with ringing halos"),
        confound="strong natural contrast, but the halos repeat in parallel bands unlike any real edge"),
    DefectType(
        "pixelation", visibility=1.0, colour=(60, 230, 90),
        looks=("stair-stepped, blocky detail as if upsampled from a much lower resolution",
               "coarse square pixels where fine detail should be", "a mosaic of enlarged pixels"),
        confound="a coarse texture in the subject, but the squares are axis-aligned and equal in size"),
    DefectType(
        "banding", visibility=0.75, colour=(255, 140, 0),
        looks=("flat steps of colour where tones should change smoothly", "posterised bands replacing gradients",
               "contour lines of quantised colour"),
        confound="a smooth gradient in the scene, but the steps are discrete and the surround is continuous"),
)}


def names() -> tuple[str, ...]:
    """The registered type names, in registry order."""
    return tuple(TYPES)


def colour(name: str) -> RGB:
    """The drawing colour of type ``name``; :data:`UNKNOWN_COLOUR` for a type the registry lacks."""
    entry = TYPES.get(name)
    return entry.colour if entry is not None else UNKNOWN_COLOUR


class UnknownDefectTypeError(QProbeError, ValueError):
    """A selection of defect types that is empty or names one the registry lacks."""


def check_types(types: Collection[str], where: str) -> None:
    """Raise :class:`UnknownDefectTypeError`, one line naming ``where``, unless ``types`` is a non-empty
    selection of registered types. A ``ValueError`` too, so a config's own check reads like its others."""
    unknown = sorted(set(types) - set(TYPES))
    if not types or unknown:
        what = f"unknown defect type {unknown[0]!r}" if unknown else "expected at least one defect type"
        raise UnknownDefectTypeError(f"{where}: {what} (known: {', '.join(TYPES)})")
