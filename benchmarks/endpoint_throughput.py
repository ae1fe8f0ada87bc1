"""Images per second of ``qprobe score`` against an OpenAI-compatible endpoint, by ``--concurrency``.

The endpoint is a stand-in on 127.0.0.1 (``tests/fixtures_endpoint.py``, the one the tests use) that
answers every request with a protocol-valid turn after a fixed latency, in a process of its own so
that its work is not counted as the client's: a crop call first (unless ``--no-crop``), then an
answer. Each concurrency scores a folder of bundled scikit-image photos through the whole command
(load, global view, crops, PNG encoding, results files) and prints images per second, the ratio to
concurrency 1 and the most requests the server held at once. With ``L`` s per turn and two turns,
concurrency ``N`` can reach at most ``N / (2 L)`` images per second; the target is at least 12x
concurrency 1 at 16 (the client is not the bottleneck).

    .venv/bin/python benchmarks/endpoint_throughput.py [--latency 0.5] [--no-crop] [--levels 1 4 16 64]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures_endpoint import StandInEndpoint, protocol_turns
from PIL import Image
from skimage import data

from qprobe.cli import main as qprobe
from qprobe.io import save_image_atomic

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat")


def _serve(latency: float, crop: bool, channel: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    with StandInEndpoint(protocol_turns(crop=crop), latency=latency) as server:
        channel.put(server.url)
        stop.wait()
        channel.put(server.most_in_flight)


def _folder(root: Path, count: int) -> Path:
    """``count`` photos (the bundled ones in turn, each its own file), in a folder of their own."""
    folder = root / f"photos{count}"
    folder.mkdir()
    images = [getattr(data, name)() for name in PHOTOS]
    for i in range(count):
        save_image_atomic(Image.fromarray(images[i % len(images)]).convert("RGB"), folder / f"{i:04d}.png")
    return folder


def _run(folder: Path, out: Path, concurrency: int, latency: float, crop: bool) -> tuple[float, int]:
    """Seconds ``qprobe score`` took over ``folder``, and the most requests the server held at once."""
    channel: multiprocessing.Queue = multiprocessing.Queue()
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(latency, crop, channel, stop), daemon=True)
    server.start()
    url = channel.get(timeout=60)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rc = qprobe(["score", str(folder), "--model", url, "--out", str(out), "--concurrency", str(concurrency)])
    seconds = time.perf_counter() - start
    stop.set()
    most = channel.get(timeout=60)
    server.join()
    if rc != 0:
        raise SystemExit(f"qprobe score exited {rc} at concurrency {concurrency}")
    return seconds, most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per turn")
    parser.add_argument("--no-crop", dest="crop", action="store_false", help="answer at once, no crop call")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrencies to run")
    parser.add_argument("--waves", type=int, default=4, help="photos per level: this many per slot (8 at least)")
    args = parser.parse_args()
    turns = 2 if args.crop else 1
    print(f"stand-in endpoint: {args.latency:g} s per turn, {turns} turn(s) per photo "
          f"({'crop call, then answer' if args.crop else 'answer'}); photos: scikit-image's {', '.join(PHOTOS)}")
    print(f"{'concurrency':>11} {'photos':>6} {'seconds':>8} {'images/s':>9} {'ideal':>7} {'x conc. 1':>9} "
          f"{'max in flight':>13}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        _run(_folder(Path(tmp), 2), Path(tmp) / "warm-up", 1, 0.0, args.crop)  # imports: not the client's speed
        for level in args.levels:
            count = max(8, args.waves * level)
            folder = _folder(Path(tmp), count)
            seconds, most = _run(folder, Path(tmp) / f"out{level}", level, args.latency, args.crop)
            rate = count / seconds
            base = base or rate
            print(f"{level:>11} {count:>6} {seconds:>8.2f} {rate:>9.2f} {level / (turns * args.latency):>7.1f} "
                  f"{rate / base:>9.1f} {most:>13}")


if __name__ == "__main__":
    main()
