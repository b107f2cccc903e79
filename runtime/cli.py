"""mrad-run and mrad-calibrate: score a line's frames with a bundle."""

from __future__ import annotations

import json
import signal
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Iterator

import click
import numpy as np
from PIL import Image

from . import calibration as calib
from .bundle import RETRIEVAL_MODES
from .detector import PROVIDER_CHOICES, Detector
from .errors import BundleError, MradError, SourceError
from .overlay import overlay
from .sources import Camera, Frame, file_frames, now

EXIT_OK, EXIT_BAD_ARGUMENTS, EXIT_BAD_BUNDLE, EXIT_INPUT_FAILED = 0, 2, 3, 4
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

RUN_EXAMPLES = """
\b
Examples:
  # a USB camera, with decisions from a calibration and heatmaps of every frame
  mrad-run --bundle bundles/visa-tf --camera 0 --save-maps maps/
\b
  # an RTSP stream, records to a file, give up if the camera stays away 5 minutes
  mrad-run --bundle bundles/visa-tf --camera rtsp://10.0.0.5/stream \\
      --out line3.jsonl --reconnect-timeout 300
\b
  # a folder, a glob and a video file, four frames per encoder call, fixed threshold
  mrad-run --bundle bundles/visa-tf --input parts/ --input 'line3/*.png' \\
      --input shift.mp4 --batch 4 --threshold 0.47
\b
Each frame gives one JSON line: source, frame, timestamp, score, decision (when a threshold
is known), latency_ms, map (with --save-maps); or error for a frame that could not be read.
Lines with "event" report camera gaps and, last, the run's summary.
Exit codes: 0 done (or stopped by SIGINT/SIGTERM), 2 bad arguments, 3 bad bundle,
4 input failed for good (camera never opened or stayed lost).
"""

CALIBRATE_EXAMPLES = """
\b
Examples:
  mrad-calibrate --bundle bundles/visa-tf --normal good-parts/
  mrad-calibrate --bundle bundles/visa-tf --normal good/ --quantile 1.0 --retrieval hnsw
\b
The threshold goes to <bundle>.calibration.json, which mrad-run reads by default.
"""


class Records:
    """One JSON object per line, flushed at once so that a stopped run loses nothing."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, record: dict) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()


class StopFlag:
    """Set by SIGINT or SIGTERM; the loop finishes the frame in hand, then stops."""

    def __init__(self):
        self.signal_name: str | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, _frame):
        self.signal_name = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.signal_name is not None


def _fail(message: str, code: int):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _open_detector(bundle: Path, provider: str, retrieval: str | None) -> Detector:
    try:
        return Detector(bundle, provider=provider, retrieval=retrieval)
    except BundleError as exc:
        _fail(str(exc), EXIT_BAD_BUNDLE)
    except MradError as exc:
        _fail(str(exc), EXIT_BAD_ARGUMENTS)


def _threshold(detector: Detector, threshold: float | None, calibration_file: Path | None) -> tuple[float | None, str]:
    if threshold is not None:
        return threshold, "--threshold"
    path = calibration_file or calib.default_path(detector.path)
    if calibration_file is None and not path.is_file():
        return None, "none: records carry scores only (run mrad-calibrate or pass --threshold)"
    calibration = calib.load(path, detector.path, detector.retrieval)
    return calibration.threshold, f"{path}"


def _batches(frames: Iterator[Frame], size: int, stop: StopFlag) -> Iterator[list[Frame]]:
    """Group frames; a source that fails for good first hands over the frames it already gave."""
    batch: list[Frame] = []
    while not stop:
        try:
            batch.append(next(frames))
        except StopIteration:
            break
        except SourceError:
            if batch:
                yield batch
            raise
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@click.command(epilog=RUN_EXAMPLES, context_settings=CONTEXT)
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory from mrad-export.")
@click.option("--input", "inputs", multiple=True, help="Image file, folder, glob or video file; repeat for several.")
@click.option("--camera", help="OpenCV camera index (0, 1, ...), stream URL, GStreamer pipeline or a video file.")
@click.option("--out", type=click.File("w"), default="-", help="Where the JSON lines go (default: stdout).")
@click.option("--save-maps", type=click.Path(path_type=Path, file_okay=False),
              help="Folder for heatmap overlays (PNG), one per frame.")
@click.option("--display", is_flag=True, help="Show each frame with its heatmap in a window.")
@click.option("--threshold", type=float, help="Decision threshold on the score; overrides any calibration.")
@click.option("--calibration", "calibration_file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="Calibration file [default: <bundle>.calibration.json when present].")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True,
              help="ONNX Runtime execution provider.")
@click.option("--retrieval", type=click.Choice(RETRIEVAL_MODES), default=None,
              help="exact softmax over the whole memory, or top-k through the index [default: the bundle's].")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1),
              help="Frames per encoder call: more throughput, more latency.")
@click.option("--max-frames", type=click.IntRange(min=1), help="Stop after this many frames.")
@click.option("--reconnect-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds a lost camera may stay away before the run gives up (exit 4).")
def main(bundle, inputs, camera, out, save_maps, display, threshold, calibration_file, provider, retrieval, batch,
         max_frames, reconnect_timeout):
    """Score frames from a camera, a stream, video files or images with an MRAD bundle."""
    if bool(inputs) == bool(camera):
        _fail("pass either --input or --camera (one of them)", EXIT_BAD_ARGUMENTS)
    detector = _open_detector(bundle, provider, retrieval)
    try:
        threshold, threshold_origin = _threshold(detector, threshold, calibration_file)
    except MradError as exc:
        _fail(str(exc), EXIT_BAD_ARGUMENTS)
    window = _open_window() if display else None
    if save_maps:
        save_maps.mkdir(parents=True, exist_ok=True)
    records = Records(out)
    try:
        frames = file_frames(inputs) if inputs else Camera(camera, reconnect_timeout, events=records.write).frames()
    except MradError as exc:
        _fail(str(exc), EXIT_BAD_ARGUMENTS)
    stop = StopFlag()
    if max_frames:
        frames = islice(frames, max_frames)
    stats = RunStats()
    exit_code = EXIT_OK
    try:
        for chunk in _batches(frames, batch, stop):
            for record, frame, result in _score(detector, chunk, threshold):
                if result is not None and (save_maps or window):
                    picture = overlay(frame.image, result.anomaly_map)
                    if save_maps:
                        record["map"] = str(save_maps / f"{frame.index:06d}_{Path(frame.source).stem or 'frame'}.png")
                        Image.fromarray(picture).save(record["map"])
                    if window:
                        window(picture, record)
                stats.add(record)
                records.write(record)
    except SourceError as exc:
        click.echo(f"error: {exc}", err=True)
        exit_code = EXIT_INPUT_FAILED
    except MradError as exc:
        _fail(str(exc), EXIT_BAD_ARGUMENTS)
    summary = stats.summary(threshold_origin, stop.signal_name)
    records.write({"event": "summary", "timestamp": now(), **summary})
    click.echo(stats.line(summary), err=True)
    sys.exit(exit_code)


def _score(detector: Detector, chunk: list[Frame], threshold: float | None):
    """Yield (record, frame, result) for each frame of a chunk, in order; unreadable frames get error records."""
    readable = [f for f in chunk if f.error is None]
    tic = time.perf_counter()
    results = iter(detector.predict_batch([f.image for f in readable]) if readable else [])
    latency = round((time.perf_counter() - tic) * 1000, 2)
    for frame in chunk:
        record = {"source": frame.source, "frame": frame.index, "timestamp": frame.timestamp}
        if frame.error is not None:
            yield {**record, "error": frame.error}, frame, None
            continue
        result = next(results)
        record["score"] = round(result.score, 6)
        if threshold is not None:
            record["decision"] = "anomalous" if result.score > threshold else "normal"
        record["latency_ms"] = latency
        yield record, frame, result


class RunStats:
    def __init__(self):
        self.started = time.perf_counter()
        self.latencies: list[float] = []
        self.errors = 0
        self.anomalous = 0

    def add(self, record: dict) -> None:
        if "error" in record:
            self.errors += 1
        else:
            self.latencies.append(record["latency_ms"])
            self.anomalous += record.get("decision") == "anomalous"

    def summary(self, threshold_origin: str, stopped_by: str | None) -> dict:
        elapsed = time.perf_counter() - self.started
        frames = len(self.latencies) + self.errors
        summary = {"frames": frames, "errors": self.errors, "seconds": round(elapsed, 3),
                   "fps": round(frames / elapsed, 2) if elapsed > 0 else 0.0, "threshold": threshold_origin,
                   "anomalous": self.anomalous, "stopped_by": stopped_by}
        if self.latencies:
            p50, p95 = np.percentile(self.latencies, [50, 95])
            summary.update(latency_p50_ms=round(float(p50), 2), latency_p95_ms=round(float(p95), 2))
        return summary

    @staticmethod
    def line(summary: dict) -> str:
        text = f"{summary['frames']} frames, {summary['errors']} errors, {summary['fps']:.1f} frames/s"
        if "latency_p50_ms" in summary:
            text += f", latency p50 {summary['latency_p50_ms']:.1f} ms, p95 {summary['latency_p95_ms']:.1f} ms"
        text += f"; threshold: {summary['threshold']}"
        if summary["stopped_by"]:
            text += f"; stopped by {summary['stopped_by']}"
        return text


def _open_window():
    import cv2

    try:
        cv2.namedWindow("mrad-run", cv2.WINDOW_NORMAL)
    except cv2.error:
        _fail("--display needs a screen and an OpenCV built with GUI support: install opencv-python in place of "
              "opencv-python-headless, or drop --display", EXIT_BAD_ARGUMENTS)

    def show(picture: np.ndarray, record: dict) -> None:
        bgr = np.ascontiguousarray(picture[..., ::-1])
        label = f"{record.get('score', 0):.4f} {record.get('decision', '')}"
        scale = max(bgr.shape[1] / 800, 0.3)  # legible on a 640-pixel frame, not covering a 112-pixel one
        cv2.putText(bgr, label, (4, int(4 + 25 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255),
                    max(1, round(2 * scale)))
        cv2.imshow("mrad-run", bgr)
        cv2.waitKey(1)

    return show


@click.command(epilog=CALIBRATE_EXAMPLES, context_settings=CONTEXT)
@click.option("--bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory from mrad-export.")
@click.option("--normal", "normal", multiple=True, required=True,
              help="Known-good images of the target product: folder, glob or file; repeat for several.")
@click.option("--quantile", default=calib.DEFAULT_QUANTILE, show_default=True, type=click.FloatRange(0, 1),
              help="Threshold = this quantile of the known-good scores (1.0: their maximum).")
@click.option("--out", "out_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Calibration file [default: <bundle>.calibration.json].")
@click.option("--provider", type=click.Choice(PROVIDER_CHOICES), default="auto", show_default=True)
@click.option("--retrieval", type=click.Choice(RETRIEVAL_MODES), default=None,
              help="Retrieval to calibrate for [default: the bundle's]; mrad-run must use the same.")
def calibrate_main(bundle, normal, quantile, out_file, provider, retrieval):
    """Score known-good images and store a decision threshold beside the bundle."""
    detector = _open_detector(bundle, provider, retrieval)
    scores, unreadable = [], []
    try:
        for frame in file_frames(normal):
            if frame.error:
                unreadable.append(frame.source)
                click.echo(f"skipped: {frame.error}", err=True)
            else:
                scores.append(detector.predict(frame.image).score)
        calibration = calib.calibrate(scores, quantile, detector.retrieval, detector.path)
    except MradError as exc:
        _fail(str(exc), EXIT_BAD_ARGUMENTS)
    path = out_file or calib.default_path(detector.path)
    calib.save(calibration, path)
    click.echo(calibration.summary(), err=True)
    click.echo(f"calibration written to {path}" + (f"; {len(unreadable)} unreadable images skipped" if unreadable else ""),
               err=True)
