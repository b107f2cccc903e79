"""mrad-bench: per-stage latency and throughput of a bundle, and its speed against PyTorch.

Every figure is measured in one process, on the same frames: the ratio line
against the PyTorch rendering survives a noisy machine where absolute
timings do not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import platform
import resource
import sys
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort

from mrad.runtime import Detector, MradError
from mrad.runtime.commands.common import bundle_option, command
from mrad.runtime.commands.sign import trusted_key_option
from mrad.runtime.memories.enrollment import TargetMemory
from mrad.runtime.core.graphs import OPENVINO_PRECISIONS, PROVIDER_CHAINS
from mrad.runtime.core.memory import HNSW_INSTALL, hnswlib_installed
from mrad.runtime.core.preprocess import load_rgb

from .evaluate import compare_retrieval
from .synth import render_scene

# The Detector's stages, in order; "preprocess" includes decoding the frames, "text" (MRAD-CLIP's
# text graph and patch-text map) is zero for TF and FT bundles, "compare" (the line's own memories,
# and the fusion) is zero when nothing is enrolled.
STAGES = ("preprocess", "encode", "retrieve", "text", "compare", "map_and_score")
# With a per-part memory: segmenting the frame, and cropping, encoding and comparing its parts (pasting them back
# is part of map_and_score).
# The measured fp32 reference the encoder's throughput is set against: a product of two matrices this large.
MATMUL_SIDE, MATMUL_ROUNDS = 2048, 5
OBJECT_STAGES = ("preprocess", "encode", "retrieve", "text", "compare", "segment", "objects", "map_and_score")


def encoder_gflop(model: dict, image_size: int) -> float | None:
    """Floating-point operations of one encoder pass (multiply-adds x 2), from the model's dimensions.

    Per block, N tokens of width W: qkv 3NW^2, the out-projection twice (ordinary and v-v paths) 2NW^2, the MLP
    8NW^2, and the attention products N^2W each (q k^T and weights x v; the v-v path adds v v^T and its x v in
    every block but the first). Softmax, norms and the patch embedding are left out (a few percent).
    """
    try:
        width, layers, patch = int(model["width"]), int(model["layers"]), int(model["patch_size"])
    except (KeyError, TypeError, ValueError):
        return None
    tokens = (image_size // patch) ** 2 + 1
    dense = 13 * tokens * width ** 2
    multiply_adds = layers * dense + (2 * layers + 2 * (layers - 1)) * tokens ** 2 * width
    return 2 * multiply_adds / 1e9


def matmul_gflops(side: int = MATMUL_SIDE, rounds: int = MATMUL_ROUNDS) -> tuple[float, str]:
    """What this machine's fp32 matrix products reach now, measured: the fastest of ``rounds`` products of two
    ``side`` x ``side`` matrices through NumPy's BLAS (all its threads). A figure set against it can never read
    above what the hardware did, as one set against a nominal clock did (109% on an AMD EPYC)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((side, side), dtype=np.float32) for _ in range(2))
    a @ b  # warm-up: threads started, pages touched
    best = float("inf")
    for _ in range(rounds):
        tic = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tic)
    return 2 * side ** 3 / best / 1e9, f"a {side}x{side} fp32 matrix product through NumPy's BLAS, best of {rounds}"


def synthetic_frames(count: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """Textured frames with a bright blob: real-looking work for every stage."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for _ in range(count):
        base = 120 + 60 * np.sin(xx / rng.uniform(3, 9)) * np.cos(yy / rng.uniform(3, 9))
        frame = np.clip(base[..., None] + rng.normal(0, 8, size=(height, width, 3)), 0, 255)
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 < (min(width, height) // 12) ** 2] = 250
        frames.append(frame.astype(np.uint8))
    return frames


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes on macOS, KiB on Linux


def time_stages(detector: Detector, frames: list[np.ndarray], batch: int, iterations: int, warmup: int,
                mode: str | None = None) -> dict:
    """Per-stage and end-to-end milliseconds per batch (p50, p95) and images per second."""
    chosen = [frames[i % len(frames)] for i in range(batch)]
    parts = detector.objects is not None and detector.objects.active
    names = OBJECT_STAGES if parts else STAGES
    samples = {stage: [] for stage in names + ("total",)}
    for i in range(warmup + iterations):
        ticks = [time.perf_counter()]
        rgb = [load_rgb(f) for f in chosen]
        batch_in = detector.preprocess(rgb)
        ticks.append(time.perf_counter())
        encoded = detector.encode(batch_in)
        ticks.append(time.perf_counter())
        retrieved = detector.retrieve(encoded, mode=mode)
        ticks.append(time.perf_counter())
        aligned = detector.align(encoded, retrieved)
        ticks.append(time.perf_counter())
        comparison = detector.compare(encoded)
        fused = detector.fuse(aligned, comparison)
        ticks.append(time.perf_counter())
        scene = None
        if parts:
            found = detector.segment(chosen)
            ticks.append(time.perf_counter())
            scene = detector.compare_objects(chosen, found, comparison)
            ticks.append(time.perf_counter())
        detector.map_and_score(fused, [(image.height, image.width) for image in rgb], scene)
        ticks.append(time.perf_counter())
        if i >= warmup:
            for stage, start, end in zip(names, ticks, ticks[1:]):
                samples[stage].append((end - start) * 1000)
            samples["total"].append((ticks[-1] - ticks[0]) * 1000)
    row = {stage: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))} for stage, v in samples.items()}
    row["images_per_s"] = batch * 1000 / row["total"]["p50"]
    return row


def available_providers() -> list[str]:
    have = ort.get_available_providers()
    chosen = [name for name, chain in PROVIDER_CHAINS.items() if chain[0] in have]
    if importlib.util.find_spec("openvino") is not None:
        chosen += list(OPENVINO_PRECISIONS)
    return chosen


def format_rows(rows: dict[int, dict]) -> str:
    """One line per batch size: p50 / p95 of each stage and of the whole, then images per second."""
    names = tuple(name for name in next(iter(rows.values())) if name != "images_per_s")
    lines = [f"{'batch':>5}" + "".join(f"{name:>21}" for name in names) + f"{'img/s':>9}"]
    for batch, row in rows.items():
        cells = "".join(f"{row[n]['p50']:>11.2f} /{row[n]['p95']:>8.2f}" for n in names)
        lines.append(f"{batch:>5}{cells}{row['images_per_s']:>9.2f}")
    return "\n".join(lines)


@command("mrad-bench", epilog="""
\b
Examples:
  mrad-bench --bundle bundles/visa-tf
  mrad-bench --bundle bundles/visa-tf --batch-sizes 1,8 --iterations 20 --json bench.json
  mrad-bench --bundle bundles/visa-tf --images parts/ --no-torch
\b
  # scenes of 6 parts: the segment and per-part stages, with 4 enrolled scenes
  mrad-bench --bundle bundles/visa-tf --objects auto --parts 6 --enroll-shots 4 --frame-size 640x480
\b
Times are milliseconds per batch; img/s is batch size over the median batch time.
Without PyTorch installed (a runtime-only install) the PyTorch comparison is skipped.
""")
@bundle_option
@click.option("--batch-sizes", default="1,4", show_default=True, help="Comma-separated batch sizes.")
@click.option("--iterations", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0))
@click.option("--frame-size", default="640x480", show_default=True, help="WIDTHxHEIGHT of the synthetic frames.")
@click.option("--images", "image_dir", type=click.Path(path_type=Path, exists=True),
              help="Use these images instead of synthetic frames.")
@click.option("--providers", default="all", show_default=True,
              help="Comma-separated (cpu, cuda, tensorrt, openvino, openvino-bf16) or 'all' available.")
@click.option("--no-torch", is_flag=True, help="Skip the PyTorch rendering and the ratio line (skipped anyway without torch).")
@click.option("--pretrained", help="Weights for the PyTorch rendering when the bundle came from a file.")
@click.option("--ft-checkpoint", type=click.Path(path_type=Path, exists=True),
              help="Checkpoint for the PyTorch rendering of an FT or CLIP bundle [default: the one beside the bundle].")
@click.option("--enroll-shots", type=click.IntRange(min=1),
              help="Enroll this many synthetic normal frames first (in memory only) and time the compare stage "
                   "with them, and the enrollment per image.")
@click.option("--against", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Another bundle of the same model (another precision, say): encode times of both, interleaved on "
                   "the same frames in this run, and their ratio.")
@click.option("--objects", help="With --enroll-shots: frames are generated scenes of --parts parts, enrolled with a "
                                "per-part memory segmented by 'auto' or a segmenter's .onnx file; times its stages.")
@click.option("--parts", default=6, show_default=True, type=click.IntRange(min=1), help="Parts per scene with --objects.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False))
@trusted_key_option
def main(**options):
    """Latency per stage (preprocess, encode, retrieve, text, compare, map_and_score) and throughput, per provider and batch size."""
    bench(**options)


def bench(bundle, batch_sizes, iterations, warmup, frame_size, image_dir, providers, no_torch, pretrained,
          ft_checkpoint, json_out, enroll_shots=None, against=None, objects=None, parts=6, trusted_keys=()):
    batches = [int(b) for b in batch_sizes.split(",")]
    if objects and not enroll_shots:
        raise MradError("--objects times a per-part memory: pass --enroll-shots too (scenes to enroll)")
    if objects:
        width, height = (int(v) for v in frame_size.lower().split("x"))
        frames = scene_frames(max(batches) + enroll_shots, width, height, parts)
        shots, frames = frames[:enroll_shots], frames[enroll_shots:]
    elif image_dir:
        from mrad.runtime.line.sources import file_frames

        frames = [f.image for f in file_frames([str(image_dir)]) if f.image is not None][: max(batches)]
    else:
        width, height = (int(v) for v in frame_size.lower().split("x"))
        frames = synthetic_frames(max(batches), width, height)
    chosen = available_providers() if providers == "all" else providers.split(",")
    loaded, load_ms = {}, {}
    for provider in chosen:  # opening includes the provider's own graph optimisation or compilation
        tic = time.perf_counter()
        loaded[provider] = Detector(bundle, provider=provider, trusted_keys=trusted_keys)
        load_ms[provider] = (time.perf_counter() - tic) * 1000
    first = loaded[chosen[0]]
    manifest = first.manifest
    report = {
        "bundle": str(bundle),
        "model": f"{manifest.model['name']} @ {manifest.preprocess.image_size}, {manifest.variant}, "
                 f"{manifest.graphs['encoder'].precision}, weights: {manifest.model['weights']}",
        "memory": ", ".join(f"{m.count} {name} entries" for name, m in manifest.memories.items()),
        "machine": f"{platform.processor() or platform.machine()}, {_cpu_count()} cores, {platform.system()}",
        "onnxruntime": ort.__version__,
        "providers": {},
    }
    click.echo(f"model {report['model']}\nmemory {report['memory']}\nmachine {report['machine']}, "
               f"onnxruntime {ort.__version__}")
    for provider in chosen:
        detector = loaded[provider]
        if objects:
            report.setdefault("enrollment", {})[provider] = enroll_scenes(detector, shots, objects)
            e = report["enrollment"][provider]
            click.echo(f"\nprovider {provider}: enrolled {enroll_shots} scenes of {parts} parts with a per-part memory "
                       f"({objects}): {e['ms_per_scene']:.1f} ms per scene; {e['parts']} parts, {e['part_entries']} part "
                       f"patches per scale; {len(frames)} other scenes timed")
        elif enroll_shots:
            report.setdefault("enrollment", {})[provider] = enroll_synthetic(detector, enroll_shots, frames[0].shape)
            e = report["enrollment"][provider]
            click.echo(f"\nprovider {provider}: enrolled {enroll_shots} synthetic normal frames one by one (in memory): "
                       f"median {e['ms_per_image_median']:.1f} ms per image, at most {e['ms_per_image_max']:.1f} ms "
                       f"(encoder call, insertion; the coreset when a level passes the cap)"
                       + (f", median {e['ms_per_image_at_cap']:.1f} ms once full (swaps)" if e["ms_per_image_at_cap"]
                          else "") + "; "
                       f"{e['entries_per_scale']} entries per scale; compare stage {e['compare_ms_exact']:.1f} ms "
                       f"searched exactly, {e['compare_ms_as_set']:.1f} ms as set (hnsw from "
                       f"{e['exact_below']} entries)")
        rows = {b: time_stages(detector, frames, b, iterations, warmup) for b in batches}
        report["providers"][provider] = {"load_ms": round(load_ms[provider], 1), **{str(b): row for b, row in rows.items()}}
        click.echo(f"\nprovider {provider} ({detector.providers[0]}), retrieval {detector.retrieval}, opened in "
                   f"{load_ms[provider] / 1000:.1f} s; milliseconds per batch, p50 / p95:\n{format_rows(rows)}")

    if against:
        report["against"] = encode_against(first, Detector(against, provider=chosen[0], trusted_keys=trusted_keys), frames, iterations, warmup)
        a = report["against"]
        click.echo(f"\nencode at batch 1, interleaved: {a['this']} {a['this_ms']:.1f} ms, {a['other']} "
                   f"{a['other_ms']:.1f} ms: this bundle takes {a['ratio']:.2f}x the time of the other; scores differ "
                   f"by up to {a['score_max_abs_diff']:.4g} on {len(frames)} frames")

    gflop = encoder_gflop(manifest.model, manifest.preprocess.image_size)
    # an fp32 reference says nothing of int8 or fp16 arithmetic (VNNI, AMX): only fp32 is set against it
    peak = matmul_gflops() if "cpu" in chosen[0] and manifest.graphs["encoder"].precision == "fp32" else None
    if gflop and chosen[0] in report["providers"]:
        batch = batches[0]
        encode_ms = report["providers"][chosen[0]][str(batch)]["encode"]["p50"]
        achieved = gflop * batch / (encode_ms / 1000)
        report["encoder_gflop_per_image"], report["encoder_gflops"] = gflop, achieved
        line = f"\nencoder: {gflop:.1f} GFLOP per image, {achieved:.1f} GFLOP/s achieved at batch {batch}"
        if peak:
            report["cpu_matmul_gflops"] = peak[0]
            line += (f", {100 * achieved / peak[0]:.0f}% of the {peak[0]:.0f} GFLOP/s measured just before by "
                     f"{peak[1]}")
        click.echo(line)

    report["retrieval"] = compare_retrieval_modes(first, frames, iterations, warmup)
    r = report["retrieval"]
    if r.get("hnsw_ms") is None:
        click.echo(f"\nretrieval at batch 1: exact {r['exact_ms']:.2f} ms; hnsw not measured (hnswlib is not "
                   f"installed: {HNSW_INSTALL})")
    else:
        click.echo(f"\nretrieval at batch 1: exact {r['exact_ms']:.2f} ms, hnsw {r['hnsw_ms']:.2f} ms "
                   f"(top_k {manifest.scoring.top_k}); hnsw moves scores by up to {r['score_max_abs_diff']:.6f} "
                   f"(mean {r['score_mean_abs_diff']:.6f})")
    report["peak_rss_mb_runtime"] = peak_rss_mb()
    click.echo(f"peak memory (RSS) of the runtime: {report['peak_rss_mb_runtime']:.0f} MB")

    if not no_torch and not _torch_installed():
        no_torch = True
        click.echo("\nPyTorch is not installed (runtime-only install): the PyTorch comparison is skipped")
    if not no_torch:
        report["pytorch"] = compare_with_torch(first, frames, batches[0], iterations, warmup, pretrained, ft_checkpoint,
                                               report["providers"][chosen[0]][str(batches[0])])
        t = report["pytorch"]
        click.echo(f"\nPyTorch rendering (eager, full softmax, {t['device']}), batch {batches[0]}: "
                   f"{t['torch_ms_p50']:.2f} ms per batch; scores agree within {t['score_max_abs_diff']:.2e}")
        click.echo(f"ratio: mrad-edge ({chosen[0]}) runs {t['speedup']:.2f}x the speed of the PyTorch rendering "
                   f"(batch {batches[0]}, same weights, memory and frames)")
    if json_out:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


def encode_against(this: Detector, other: Detector, frames, iterations: int, warmup: int) -> dict:
    """Median encode time of two bundles on the same frame, alternated so that machine noise hits both alike."""
    batch = this.preprocess([load_rgb(frames[0])])
    samples = ([], [])
    for i in range(warmup + iterations):
        for times, detector in zip(samples, (this, other)):
            tic = time.perf_counter()
            detector.encode(batch)
            if i >= warmup:
                times.append((time.perf_counter() - tic) * 1000)
    this_ms, other_ms = float(np.median(samples[0])), float(np.median(samples[1]))
    differences = [abs(this.predict(f).score - other.predict(f).score) for f in frames]
    precision = [d.manifest.graphs["encoder"].precision for d in (this, other)]
    return {"this": f"{this.path.name} ({precision[0]})", "other": f"{other.path.name} ({precision[1]})",
            "this_ms": this_ms, "other_ms": other_ms, "ratio": this_ms / other_ms,
            "score_max_abs_diff": float(max(differences))}


def scene_frames(count: int, width: int, height: int, parts: int, seed: int = 0) -> list[np.ndarray]:
    """Generated scenes of ``parts`` capsules on a plain background (mrad-synth --scene objects), one in three broken."""
    rng = np.random.default_rng(seed)
    colours = (rng.uniform(20, 70, size=3), rng.uniform(150, 240, size=3), rng.uniform(90, 200, size=3))
    return [np.clip(render_scene(rng, "capsules", colours, height, width, parts, "spot" if i % 3 == 2 else None)[0],
                    0, 255).astype(np.uint8) for i in range(count)]


def enroll_scenes(detector: Detector, shots: list[np.ndarray], objects: str) -> dict:
    """Enroll scenes into a fresh in-memory enrollment with a per-part memory; the time per scene."""
    detector.line_memory.start_trial()
    tic = time.perf_counter()
    detector.line_memory.enroll(shots, "normal", save=False, objects=objects)
    elapsed = (time.perf_counter() - tic) * 1000
    finest = f"normal/patch_{detector.target.settings.scales[0]}"
    return {"shots": len(shots), "ms_per_scene": elapsed / len(shots), "parts": sum(detector.objects.counts),
            "part_entries": detector.objects.memory.counts[finest]}


def enroll_synthetic(detector: Detector, shots: int, shape: tuple[int, ...], repeats: int = 3) -> dict:
    """Enroll ``shots`` synthetic frames one by one into a fresh in-memory enrollment; time each, and compare.

    Each enrollment is one encoder call plus insertion (and, for the one that
    takes a level past the cap, the coreset). The compare stage is then timed
    on one frame with each level searched exactly and as the settings say.
    """
    height, width = shape[:2]
    target = detector.line_memory.start_trial()
    frames = synthetic_frames(shots + 1, width, height, seed=1)
    finest = f"normal/patch_{target.settings.scales[0]}"
    per_image, full = [], []
    for frame in frames[:shots]:
        full.append(target.counts[finest] >= target.settings.cap)
        tic = time.perf_counter()
        detector.line_memory.enroll([frame], "normal", save=False)
        per_image.append((time.perf_counter() - tic) * 1000)
    encoded = detector.encode(detector.preprocess([load_rgb(frames[-1])]))
    exact = TargetMemory.restored(dataclasses.replace(target.settings, exact_below=2 ** 62), target.grid,
                                  target.image_dim, target.token_dim, *target.snapshot())
    compare_ms = {}
    for mode, memory in (("exact", exact), ("as set", target)):
        samples = []
        for _ in range(repeats + 1):
            tic = time.perf_counter()
            detector.compare(encoded, memory)
            samples.append((time.perf_counter() - tic) * 1000)
        compare_ms[mode] = float(np.median(samples[1:]))  # the first builds hnsw indexes
    at_cap = [ms for ms, was_full in zip(per_image, full) if was_full]
    return {"shots": shots, "ms_per_image": per_image, "ms_per_image_median": float(np.median(per_image)),
            "ms_per_image_max": max(per_image), "ms_per_image_at_cap": float(np.median(at_cap)) if at_cap else None,
            "entries_per_scale": target.counts[finest], "exact_below": target.settings.exact_below,
            "compare_ms_exact": compare_ms["exact"], "compare_ms_as_set": compare_ms["as set"]}


def compare_retrieval_modes(detector: Detector, frames, iterations: int, warmup: int) -> dict:
    rgb = [load_rgb(frames[0])]
    encoded = detector.encode(detector.preprocess(rgb))
    timings = {}
    if not hnswlib_installed():  # its absence would time exact retrieval a second time, under hnsw's name
        modes = ("exact",)
    else:
        modes = ("exact", "hnsw")
    for mode in modes:
        samples = []
        for i in range(warmup + iterations):
            tic = time.perf_counter()
            detector.retrieve(encoded, mode=mode)
            if i >= warmup:
                samples.append((time.perf_counter() - tic) * 1000)
        timings[f"{mode}_ms"] = float(np.median(samples))
    if len(modes) == 1:
        return {**timings, "hnsw_ms": None}
    return {**timings, **compare_retrieval(detector, frames)}


def compare_with_torch(detector: Detector, frames, batch: int, iterations: int, warmup: int, pretrained,
                       ft_checkpoint, ours: dict) -> dict:
    import torch

    from .reference import TorchReference

    device = "cuda" if torch.cuda.is_available() and "CUDAExecutionProvider" in detector.providers else "cpu"
    reference = TorchReference(detector, pretrained=pretrained, ft_checkpoint=ft_checkpoint, device=device)
    rgb = [load_rgb(frames[i % len(frames)]) for i in range(batch)]
    samples, scores = [], None
    for i in range(warmup + iterations):
        tic = time.perf_counter()
        scores = reference.scores(detector.preprocess(rgb))
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            samples.append((time.perf_counter() - tic) * 1000)
    ours_scores = np.array([r.score for r in detector.predict_batch(rgb)])
    torch_ms = float(np.median(samples))
    return {"device": device, "torch_ms_p50": torch_ms, "speedup": torch_ms / ours["total"]["p50"],
            "score_max_abs_diff": float(np.abs(ours_scores - scores).max())}


def _torch_installed() -> bool:
    try:
        return importlib.util.find_spec("torch") is not None
    except ImportError:
        return False


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
