"""Gates for the Probe-CoT, Probe-RL and stage-1 sets (run before the stage writes them).

* every SFT assistant turn parses under the protocol and passes its strict format check, the turns
  alternate tool call -> tool result, the last turn is the answer, and every image block carries
  its image (trl's collator does not fill placeholders in tool turns);
* in context-aware mode every crop that covers a defect contains its box with the pristine margin
  the planner promises (where the image border allows);
* the low:high resolution ratio is within tolerance;
* splits are clean: only the configured training splits, and no source photo of the bench's test
  split, reach any training set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import great_expectations.expectations as gxe
import pandas as pd

from qprobe.agent import protocol
from qprobe.trajectories.config import TrajectoriesConfig
from qprobe.validation.core import Suite, require


def _turns_ok(df: pd.DataFrame) -> Iterable[str]:
    for row in df.itertuples():
        messages: list[dict[str, Any]] = row.messages
        empty = sum(b["type"] == "image" and b.get("image") is None for m in messages for b in m["content"])
        if empty:
            yield f"{row.id}: {empty} image blocks without their image (SFT images go inline)"
        assistants = [m for m in messages if m["role"] == "assistant"]
        if not assistants or messages[-1]["role"] != "assistant":
            yield f"{row.id}: the conversation must end with an assistant answer"
            continue
        for k, m in enumerate(assistants):
            text = "".join(b["text"] or "" for b in m["content"] if b["type"] == "text")
            parsed = protocol.parse_assistant(text)
            failure = protocol.format_failure(text)
            last = k == len(assistants) - 1
            if isinstance(parsed, protocol.ParseFailure) or failure is not None:
                reason = parsed.detail if isinstance(parsed, protocol.ParseFailure) else failure.detail
                yield f"{row.id}: assistant turn {k} does not pass the protocol ({reason})"
            elif last != isinstance(parsed, protocol.Answer):
                yield f"{row.id}: assistant turn {k} should be {'the answer' if last else 'a tool call'}"
        for i, m in enumerate(messages):
            if m["role"] == "tool" and (i == 0 or messages[i - 1]["role"] != "assistant"):
                yield f"{row.id}: tool turn {i} does not follow a tool call"


def _margins(cfg: TrajectoriesConfig) -> Any:
    def check(df: pd.DataFrame) -> Iterable[str]:
        if cfg.planner.strategy != "context_aware":
            return
        for row in df[df["kind"] == "high"].itertuples():
            covering = [c for c, has in zip(row.crops, row.crop_has_defect, strict=True) if has]
            for d in row.defects:
                owners = [c for c in covering if c[0] <= d[0] and c[1] <= d[1] and c[2] >= d[2] and c[3] >= d[3]]
                if not owners and len(covering) < cfg.protocol.max_crops:
                    yield f"{row.id}: defect {list(d)} is in no crop"
                    continue
                if owners and not any(_surrounded(c, d, row.width, row.height, cfg.planner.margin) for c in owners):
                    yield f"{row.id}: crops {owners} keep less than a {cfg.planner.margin:.0%} margin around {list(d)}"
    return check


def _surrounded(c: Any, d: Any, width: int, height: int, margin: float) -> bool:
    mx, my = int(margin * (d[2] - d[0])) - 1, int(margin * (d[3] - d[1])) - 1
    return ((c[0] == 0 or d[0] - c[0] >= mx) and (c[1] == 0 or d[1] - c[1] >= my)
            and (c[2] >= width or c[2] - d[2] >= mx) and (c[3] >= height or c[3] - d[3] >= my))


def _ratio(cfg: TrajectoriesConfig) -> Any:
    def check(df: pd.DataFrame) -> Iterable[str]:
        high = int((df["kind"] == "high").sum())
        low = int((df["kind"] == "low").sum())
        ratio = low / max(high, 1)
        # Rounding a small set can shift the ratio by one sample: allow that on top of the tolerance.
        slack = cfg.low_high_ratio * cfg.ratio_tolerance + 1 / max(high, 1)
        if abs(ratio - cfg.low_high_ratio) > slack:
            yield f"low:high ratio is {ratio:.2f} ({low}:{high}), expected {cfg.low_high_ratio} +- {slack:.2f}"
    return check


def _clean_splits(cfg: TrajectoriesConfig, manifest: pd.DataFrame) -> Any:
    test_sources = set(manifest.loc[manifest["split"] == "test", "source"])

    def check(df: pd.DataFrame) -> Iterable[str]:
        bad = sorted(set(df["split"]) - set(cfg.train_splits))
        if bad:
            yield f"rows from splits {bad} (only {cfg.train_splits} may be used for training)"
        leaked = sorted(set(df["source"]) & test_sources)
        if leaked:
            yield f"{len(leaked)} test-split source photos reached training, e.g. {leaked[:3]}"
    return check


def validate_sets(cfg: TrajectoriesConfig, manifest: pd.DataFrame, *, sft: pd.DataFrame, rl: pd.DataFrame,
                  stage1: pd.DataFrame) -> None:
    """Raise :class:`~qprobe.validation.core.ValidationError` listing every failure of the three sets."""
    common = [gxe.ExpectColumnValuesToNotBeNull(column="id"),
              gxe.ExpectColumnValuesToBeBetween(column="mos", min_value=1.0, max_value=5.0)]
    splits = _clean_splits(cfg, manifest)
    stage1_splits = splits if cfg.stage1_source == "bench" else _clean_splits(cfg, stage1.assign(source=""))
    require(
        (Suite("sft", [*common, gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=["low", "high"])],
               [_turns_ok, _margins(cfg), _ratio(cfg), splits]), sft),
        (Suite("rl", [*common, gxe.ExpectColumnValuesToNotBeNull(column="original")], [splits]), rl),
        (Suite("stage1", common, [stage1_splits]), stage1),
        name=f"{cfg.out} (stage1, sft, rl)",
    )
