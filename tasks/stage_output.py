"""A running stage's output, relayed as it comes: to the terminal and, as lines, to a log.

Every piece is prefixed with the stage's name (``[stage2] ...``). A progress bar redraws itself with
carriage returns; how it is relayed depends on where it goes:

* a terminal gets the text raw, so bars stay bars (each redrawn frame carries the prefix);
* anything else (a file, CI's pipe) and the log get lines: every finished line, and of the redrawn
  frames one per ``interval`` seconds at most, so a bar becomes a periodic progress line instead of
  thousands of frames. :func:`child_env` makes the stages' own tqdm bars redraw that seldom too.

The first lines are kept (DVC says there whether it runs the stage), and the last ones, for the
error message of a stage that fails.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

# Seconds between two frames of a progress bar relayed as lines.
PROGRESS_INTERVAL_S = 10.0
_BREAKS = re.compile(r"(\r\n|\r|\n)")


def child_env(stream: TextIO, interval: float = PROGRESS_INTERVAL_S) -> dict[str, str]:
    """Environment for a stage whose output :class:`StageOutput` relays to ``stream``.

    Python buffers a pipe's output in blocks: unbuffered, each line arrives as it is printed. tqdm reads
    ``TQDM_*`` as defaults of every bar (datasets', transformers' and ours): when the output ends up as
    lines, a bar redraws once per ``interval`` instead of ten times a second.
    """
    env = {"PYTHONUNBUFFERED": "1"}
    if not stream.isatty():
        env["TQDM_MININTERVAL"] = str(interval)
    return env


class StageOutput:
    """Feed it a stage's output in pieces (:meth:`feed`), then :meth:`close` it; see the module's docstring."""

    def __init__(self, stage: str, stream: TextIO, log: Callable[[str], None] | None = None,
                 interval: float = PROGRESS_INTERVAL_S, keep: int = 50) -> None:
        self.prefix = f"[{stage}] "
        self.stream = stream
        self.raw = stream.isatty()
        self.log = log
        self.interval = interval
        self.keep = keep
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=keep)
        self._segment = ""  # the text since the last line break or carriage return
        self._frame = False  # that text follows a carriage return: a bar's frame, redrawn in place
        self._shown = ""  # the frame last relayed as a line
        self._last_frame = -float("inf")
        self._fresh = True  # raw output: the next text starts a segment, and takes the prefix
        self._held = ""  # a carriage return that ended the last piece: the next may bring its "\n"

    def feed(self, text: str) -> None:
        text, self._held = self._held + text, ""
        if text.endswith("\r"):
            text, self._held = text[:-1], "\r"
        if self.raw:
            self._write_raw(text)
        pieces = _BREAKS.split(text)
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                self._segment += piece
            elif piece == "\r":  # whatever it ended, or began with, is a frame that the next one overwrites
                self._frame = True
                self._relay_frame()
                self._segment = ""
            else:
                self._end_line()
        self._relay_frame()

    def close(self) -> None:
        """Relay what is left: the final state of a bar, or a last line without a line break."""
        self._held = ""
        if self._segment.strip():
            self._end_line()
        if self.raw and not self._fresh:
            self.stream.write("\n")
            self.stream.flush()

    def _write_raw(self, text: str) -> None:
        out = []
        for i, piece in enumerate(_BREAKS.split(text)):
            if i % 2:
                out.append(piece)
                self._fresh = True
            elif piece:
                # A bar clears its line with blanks first: they take no prefix, what follows does.
                if self._fresh and piece.strip():
                    out.append(self.prefix)
                    self._fresh = False
                out.append(piece)
        self.stream.write("".join(out))
        self.stream.flush()

    def _relay_frame(self) -> None:
        frame = self._segment.strip()
        if not self._frame or not frame or frame == self._shown:
            return
        now = time.monotonic()
        if now - self._last_frame >= self.interval:
            self._last_frame = now
            self._shown = frame
            self._emit(frame)

    def _end_line(self) -> None:
        line = self._segment.rstrip()
        if line.strip():
            if len(self.head) < self.keep:
                self.head.append(line)
            self.tail.append(line)
            if line.strip() != self._shown:  # a bar's final frame, already relayed, ends with this line break
                self._emit(line)
        self._segment, self._frame, self._shown = "", False, ""

    def _emit(self, line: str) -> None:
        if not self.raw:
            self.stream.write(self.prefix + line + "\n")
            self.stream.flush()
        if self.log is not None:
            self.log(self.prefix + line)
