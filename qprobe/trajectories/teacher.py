"""Optional teacher: a vision-language model rewrites a trajectory's reasoning from the pixels.

The template bank (:mod:`qprobe.trajectories.composer`) is correct by construction but repetitive.
With ``--teacher URL`` (an OpenAI-compatible endpoint, e.g. ``vllm serve Qwen/Qwen2.5-VL-72B-Instruct``)
each high-resolution trajectory is sent with its images (global view and crops), the ground truth
and the drafted reasoning; the teacher answers with JSON::

    {"score": 3.4, "defect_types": ["blur"], "thoughts": ["...", "...", "..."]}

one thought per assistant turn. The rewrite is **kept** only when all of these hold, else the
template text stays and the rejection is counted with its reason:

* the answer is that JSON, with exactly one non-empty thought per turn and no protocol tags inside;
* the teacher's own score is within ``tolerance`` of the MOS and it names the same defect types;
* every rebuilt turn (the teacher's thought + the original tool call or answer) passes the
  protocol's strict format check, so the actions, boxes and final answer never change.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from qprobe.agent import protocol
from qprobe.agent.backends import OpenAIBackend
from qprobe.errors import QProbeError

TEACHER_SYSTEM = (
    "You are an expert in image quality assessment. You rewrite the reasoning of an assistant that "
    "inspects a high-resolution photo: it looks at a downscaled global view, crops regions at native "
    "resolution, and rates the photo. Rewrite each reasoning step so that it describes what the images "
    "actually show, in fluent varied English: a global impression first, then for each crop local "
    "scrutiny and a critical check against the context (natural depth of field is not blur; grain "
    "that runs through the whole photo is not a local defect; a zoomed region may be clean). Never "
    "mention severity levels, numbers of the ground truth, file names or that you were given the answer."
)


@dataclass
class TeacherStats:
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)

    def as_metrics(self) -> dict[str, int]:
        return {"teacher_kept": self.kept, "teacher_rejected": sum(self.rejected.values()),
                **{f"teacher_rejected_{k}": v for k, v in sorted(self.rejected.items())}}


def _request_messages(sample: dict[str, Any], thinks: list[str]) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    for m in sample["messages"]:
        for block in m["content"]:
            if block["type"] == "image":
                label = "Global view:" if m["role"] == "user" else "Crop at native resolution:"
                content += [{"type": "text", "text": label}, {"type": "image", "image": block["image"]}]
    truth = {"score": round(sample["mos"], 2), "defect_types": sorted(_truth_types(sample))}
    content.append({"type": "text", "text": (
        f"Ground truth: {json.dumps(truth)}.\nDrafted reasoning, one entry per assistant turn:\n"
        f"{json.dumps(thinks, indent=1)}\n\nAnswer only with JSON: {{\"score\": <your rating 1-5>, "
        f"\"defect_types\": [<types you see>], \"thoughts\": [<exactly {len(thinks)} rewritten steps>]}}")})
    return [{"role": "system", "content": [{"type": "text", "text": TEACHER_SYSTEM}]},
            {"role": "user", "content": content}]


def _truth_types(sample: dict[str, Any]) -> set[str]:
    """Defect types of the trajectory's own final answer (the ground truth it was written from)."""
    answer = protocol.parse_assistant(sample["messages"][-1]["content"][0]["text"])
    return {d.type for d in answer.defects} if isinstance(answer, protocol.Answer) else set()


def review(reply: str, sample: dict[str, Any], n_turns: int, tolerance: float) -> list[str] | str:
    """The teacher's thoughts if the reply passes every check, else the reason for rejecting it."""
    match = re.search(r"\{.*\}", reply, flags=re.DOTALL)
    try:
        data = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        return "not_json"
    thoughts = data.get("thoughts")
    if not isinstance(thoughts, list) or len(thoughts) != n_turns:
        return "wrong_turn_count"
    if not all(isinstance(t, str) and t.strip() and "<" not in t and ">" not in t for t in thoughts):
        return "bad_thought"
    score = data.get("score")
    if not isinstance(score, int | float) or abs(float(score) - sample["mos"]) > tolerance:
        return "score_disagrees"
    types = data.get("defect_types")
    if not isinstance(types, list) or set(map(str, types)) != _truth_types(sample):
        return "defects_disagree"
    return [t.strip() for t in thoughts]


class Teacher:
    """Rewrites trajectories through an OpenAI-compatible endpoint; see the module docstring."""

    def __init__(self, url: str, tolerance: float = 0.5, max_new_tokens: int = 1024,
                 backend: OpenAIBackend | None = None) -> None:
        self.backend = backend or OpenAIBackend(url)
        self.tolerance = tolerance
        self.max_new_tokens = max_new_tokens
        self.stats = TeacherStats()

    def rewrite(self, sample: dict[str, Any]) -> dict[str, Any]:
        """``sample`` with the teacher's reasoning where accepted, else unchanged (and counted)."""
        turns = [i for i, m in enumerate(sample["messages"]) if m["role"] == "assistant"]
        drafts = [protocol.split_turn(sample["messages"][i]["content"][0]["text"]) for i in turns]
        try:
            reply = self.backend.generate(_request_messages(sample, [d[0] for d in drafts]),
                                          max_new_tokens=self.max_new_tokens).text
        except QProbeError:
            self.stats.rejected["unreachable"] += 1
            return sample
        verdict = review(reply, sample, len(turns), self.tolerance)
        if isinstance(verdict, str):
            self.stats.rejected[verdict] += 1
            return sample
        messages = [dict(m) for m in sample["messages"]]
        for i, thought, (_, action) in zip(turns, verdict, drafts, strict=True):
            text = protocol.render_turn(thought, action)
            if protocol.format_failure(text) is not None:
                self.stats.rejected["format"] += 1
                return sample
            messages[i] = {**messages[i], "content": [{"type": "text", "text": text}]}
        self.stats.kept += 1
        return {**sample, "messages": messages}
