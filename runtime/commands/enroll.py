"""mrad-enroll: teach a bundle the line's own good parts and defects, without re-export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from tqdm import tqdm

from .. import defaults
from .common import chosen_recipe, command, enrollment_option, provider_option, recipe_options
from .sign import sign_key_option, trusted_key_option
from ..core import signing
from ..core.detector import Detector
from ..memories.enrollment import AUGMENTATIONS, EnrollmentManifest
from ..errors import MradError
from ..memories.objects import ObjectSettings
from ..formats import calibration
from ..formats.station import RecipeConfig
from ..line.policy import DecisionPolicy
from ..line.sources import IMAGE_SUFFIXES, expand_inputs
from ..line.station import Recipe

EXAMPLES = """
\b
Examples:
  # good parts of the product on this line (the more views, the better)
  mrad-enroll --bundle bundles/visa-tf --normal 'good/*.png'
\b
  # defects an operator flagged, with their masks (matched by name: 007.png <- 007_mask.png or 007.png)
  mrad-enroll --bundle bundles/visa-tf --defect 'ng/*.png' --masks 'ng_masks/*.png'
\b
  # trays of several parts: also a per-part memory; parts found on a plain background ...
  mrad-enroll --bundle bundles/visa-tf --normal 'good/*.png' --objects auto
  # ... or by a SAM-family model exported to ONNX (MobileSAM, EfficientViT-SAM; never downloaded)
  mrad-enroll --bundle bundles/visa-tf --normal 'good/*.png' --objects mobile_sam.onnx --count-tolerance 1
\b
  # what is enrolled, undo the last enrollment, start over
  mrad-enroll --bundle bundles/visa-tf --list
  mrad-enroll --bundle bundles/visa-tf --rollback
  mrad-enroll --bundle bundles/visa-tf --clear
\b
  # a line that trusts only signed bundles, enrollments and thresholds: each version signed as it is saved
  mrad-enroll --bundle bundles/visa-tf --trusted-key line.pub --sign-key line.pem --normal 'good/*.png'
\b
Each enrollment is a new version beside the bundle (<bundle>/enrollment/); mrad-run, mrad-eval
and Detector use the current one. Scores change with an enrollment, so enrolling good parts or defects measures
the threshold again (each part scored with its own entries held out) and writes it where mrad-run
reads it, once 5 or more good parts are enrolled as files; below that the previous threshold stays
and mrad-run marks its records threshold_stale.
Settings (--scales, --cap, --augment, --exact-below, --objects and how parts are found) are fixed
by the first enrollment after a --clear; the fusion weights, the dual temperature, the object
weights and --count-tolerance can change at any time. With --objects, every later --normal image
feeds the per-part memory too, and mrad-run records list the parts found (box, score); a frame
whose part count lies outside the enrolled counts (widened by --count-tolerance) is anomalous.
"""


def _images(patterns: tuple[str, ...], what: str) -> list[Path]:
    # absolute: the enrollment names its images, and a later recalibration (from any folder) scores them again
    def say(text: str) -> None:
        click.echo(f"note: {text}", err=True)

    found = [p.absolute() for p in expand_inputs(patterns, what, notice=say) if p.suffix.lower() in IMAGE_SUFFIXES]
    if patterns and not found:
        raise MradError(f"{what} {' '.join(patterns)} matches no image files")
    return found


def pair_masks(defects: list[Path], masks: list[Path]) -> list[Path | None]:
    """One mask (or None) per defect image, matched by name: ``<stem>_mask.<ext>`` or ``<stem>.<ext>``."""
    by_stem: dict[str, Path] = {}
    for mask in masks:
        stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
        if stem in by_stem:
            raise MradError(f"masks {by_stem[stem]} and {mask} both match images named {stem}; keep one")
        by_stem[stem] = mask
    stems = {d.stem for d in defects}
    unmatched = sorted(str(m) for s, m in by_stem.items() if s not in stems)
    if unmatched:
        raise MradError(f"masks {unmatched[:3]} match no --defect image (a mask for 007.png is named 007_mask.png "
                        "or 007.png)")
    return [by_stem.get(d.stem) for d in defects]


def describe(manifest: EnrollmentManifest | None, current: bool = False) -> str:
    if manifest is None:
        return "nothing enrolled"
    counts = manifest.counts()
    scale = f"patch_{manifest.settings.scales[0]}"
    parts = ""
    if manifest.objects is not None:
        o = manifest.objects
        segmenter = "auto" if o.settings.segmenter == "auto" else Path(o.settings.model).name
        found = f"{min(o.counts)}..{max(o.counts)}" if o.counts else "no"
        parts = (f"; per-part memory ({segmenter}): {counts['objects']} parts in {counts['object_images']} images "
                 f"({found} per image), object map weight {o.settings.map_weight}, count tolerance "
                 f"{o.settings.count_tolerance}")
    return (f"version {manifest.version}{' (current)' if current else ''}, {manifest.created}, {manifest.action}: "
            f"{counts['normal_images']} normal images ({counts[f'normal/{scale}']} patches per scale), "
            f"{counts['defect_images']} defect images ({counts[f'defect/{scale}']} defect patches per scale); "
            f"map weight {manifest.settings.map_weight}, image weight {manifest.settings.image_weight}" + parts)


def _csv(kind):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError as exc:
            raise click.BadParameter(f"expected comma-separated values ({exc})") from exc
    return parse


@command("mrad-enroll", epilog=EXAMPLES)
@recipe_options
@click.option("--normal", multiple=True, help="Good parts of the line's product: folder, glob or file; repeatable.")
@click.option("--defect", multiple=True, help="Defective parts: folder, glob or file; repeatable.")
@click.option("--masks", multiple=True,
              help="Masks of the --defect images (white = defect), matched by name; a defect without one counts "
                   "as image-level evidence only.")
@click.option("--list", "list_versions", is_flag=True, help="List the enrollment versions kept and the current one.")
@click.option("--rollback", is_flag=True, help="Make the version before the current one current again.")
@click.option("--clear", is_flag=True, help="Forget every enrolled image (as a new version: --rollback undoes it).")
@enrollment_option
@click.option("--map-weight", type=click.FloatRange(0, 1),
              help=f"Weight of the enrolled map against the zero-shot one [new enrollments: "
                   f"{defaults.ENROLL_MAP_WEIGHT}].")
@click.option("--image-weight", type=click.FloatRange(0, 1),
              help=f"Weight of the enrolled image distance against the zero-shot p_img [new enrollments: "
                   f"{defaults.ENROLL_IMAGE_WEIGHT}].")
@click.option("--dual-temperature", type=click.FloatRange(min=0, min_open=True),
              help=f"How sharply nearness to a known defect raises a score [new enrollments: "
                   f"{defaults.DUAL_TEMPERATURE}].")
@click.option("--scales", callback=_csv(int), help=f"Patch neighbourhood sizes, comma-separated [new enrollments: "
                                                   f"{','.join(map(str, defaults.ENROLL_SCALES))}].")
@click.option("--augment", callback=_csv(str),
              help=f"Also enroll transformed copies of each image: any of {','.join(AUGMENTATIONS)}.")
@click.option("--cap", type=click.IntRange(min=1),
              help=f"Entries per memory level; past it, a greedy coreset [new enrollments: {defaults.ENROLL_CAP}].")
@click.option("--exact-below", type=click.IntRange(min=1),
              help=f"Levels smaller than this are searched exactly, larger ones through hnswlib when installed "
                   f"[new enrollments: {defaults.ENROLL_EXACT_BELOW}].")
@click.option("--objects", metavar="auto|FILE.onnx",
              help="Also build a per-part memory from the --normal images: parts found by 'auto' (plain background) "
                   "or by a SAM-family segmenter's ONNX file (hashed into the enrollment).")
@click.option("--object-map-weight", type=click.FloatRange(0, 1),
              help=f"Share of the enrolled map inside each part taken from the per-part memory "
                   f"[{defaults.OBJECT_MAP_WEIGHT}].")
@click.option("--object-image-weight", type=click.FloatRange(0, 1),
              help=f"Share of p_img taken from the largest per-part image distance [{defaults.OBJECT_IMAGE_WEIGHT}].")
@click.option("--count-tolerance", type=click.IntRange(min=0),
              help=f"Parts a frame may show beyond the enrolled counts before it is anomalous "
                   f"[{defaults.OBJECT_COUNT_TOLERANCE}].")
@click.option("--min-area", type=click.FloatRange(0, 1),
              help=f"Smallest part, as a fraction of the frame [new per-part memories: {defaults.OBJECT_MIN_AREA}].")
@click.option("--max-area", type=click.FloatRange(0, 1),
              help=f"Largest part, as a fraction of the frame [new per-part memories: {defaults.OBJECT_MAX_AREA}].")
@click.option("--margin", type=click.FloatRange(min=0),
              help=f"Crop margin around a part, as a fraction of its size [new per-part memories: "
                   f"{defaults.OBJECT_MARGIN}].")
@click.option("--calibration", "calibration_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Where the threshold measured on the enrolled good parts goes (mrad-run reads it) "
                   "[default: <bundle>.calibration.json; with --enrollment: inside its folder].")
@click.option("--quantile", type=click.FloatRange(0, 1),
              help="Threshold = this quantile of the enrolled good parts' held-out scores [default: the recipe's "
                   f"quantile, else {calibration.DEFAULT_QUANTILE}].")
@provider_option
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
@trusted_key_option
@sign_key_option
def main(bundle, station_file, recipe, normal, defect, masks, list_versions, rollback, clear, enrollment, map_weight,
         image_weight, dual_temperature, scales, augment, cap, exact_below, objects, object_map_weight,
         object_image_weight, count_tolerance, min_area, max_area, margin, calibration_file, quantile, provider, batch,
         trusted_keys, sign_key):
    """Enroll the line's own good parts and defects into a bundle's memories (no torch, no re-export)."""
    given = {k: v for k, v in dict(map_weight=map_weight, image_weight=image_weight, dual_temperature=dual_temperature,
                                   scales=scales, augment=augment, cap=cap, exact_below=exact_below).items()
             if v is not None}
    part_options = {k: v for k, v in dict(map_weight=object_map_weight, image_weight=object_image_weight,
                                          count_tolerance=count_tolerance, min_area=min_area, max_area=max_area,
                                          margin=margin).items() if v is not None}
    if objects and not normal:
        raise MradError("--objects builds a per-part memory from good parts: pass --normal images too")
    actions = [bool(normal or defect or ((given or part_options) and not clear)), list_versions, rollback, clear]
    if sum(actions) != 1:
        raise MradError("pass images to enroll (--normal and/or --defect) or settings to change, or one of --list, "
                        "--rollback, --clear")
    if masks and not defect:
        raise MradError("--masks belong to --defect images; pass --defect too")
    chosen = chosen_recipe(bundle, station_file, recipe)
    enrollment, calibration_file = enrollment or chosen.enrollment, calibration_file or chosen.calibration
    quantile = quantile if quantile is not None else chosen.quantile
    trusted_keys = signing.trusted(chosen.trusted_keys + tuple(trusted_keys))
    signer = signing.Signer.from_environment(sign_key or chosen.sign_key)
    if not (list_versions or rollback):  # a version will be written: say now, before any image is encoded
        signing.require_signer(trusted_keys, signer, "an enrollment version")
    detector = Detector(chosen.bundle, provider=provider, enrollment=enrollment, trusted_keys=trusted_keys,
                        signer=signer)
    if list_versions:
        head = detector.line_memory.store.head()
        versions = detector.line_memory.store.versions()
        if not versions:
            click.echo("nothing enrolled")
        for manifest in versions:
            click.echo(describe(manifest, manifest.version == head))
        if head is None and versions:
            click.echo("current: nothing enrolled (cleared or rolled back past the first version)")
        return
    if rollback:
        click.echo(f"now: {describe(detector.line_memory.rollback(), True)}")
        return
    current = detector.target_memory.settings
    if clear:
        click.echo(f"now: {describe(detector.line_memory.clear(dataclasses.replace(current, **given).checked()), True)}")
        return
    settings = dataclasses.replace(current, **given).checked()
    part_settings = None
    if part_options:
        if detector.objects is None and not objects:
            raise MradError("object options need a per-part memory: enroll --normal images with --objects auto|FILE")
        base = detector.objects.settings if detector.objects is not None else ObjectSettings()
        part_settings = dataclasses.replace(base, **part_options).checked()
    if settings != current or (part_settings is not None and detector.objects is not None):
        detector.line_memory.change_settings(settings, save=False, objects=part_settings if detector.objects else None)
    if not (normal or defect):
        click.echo(f"now: {describe(detector.line_memory.save('settings'), True)}")
        return
    normals, defects = _images(normal, "--normal"), _images(defect, "--defect")
    paired = pair_masks(defects, _images(masks, "--masks")) if masks else [None] * len(defects)
    with tqdm(total=len(normals) + len(defects), desc="enrolling", unit="img") as bar:
        for label, images, chosen in (("normal", normals, None), ("defect", defects, paired)):
            if images:
                done = bar.n
                parts = dict(objects=objects, object_settings=part_settings) if label == "normal" else {}
                detector.line_memory.enroll(images, label, masks=chosen, save=False, batch=batch,
                                progress=lambda n, done=done: bar.update(done + n - bar.n), **parts)
    manifest = detector.line_memory.save()
    unmasked = sum(1 for m in paired if m is None)
    click.echo(f"enrolled {len(normals)} normal and {len(defects)} defect images"
               + (f" ({unmasked} defects without a mask: image-level only)" if defects and unmasked else ""), err=True)
    if not detector.target.active:
        click.echo("warning: no normal part is enrolled yet; defects sharpen a normal memory and are not used "
                   "until good parts are enrolled (--normal)", err=True)
    click.echo(f"now: {describe(manifest, True)}")
    if normals or defects:  # enrolling and calibrating are one loop: the enrollment, then the threshold on it
        config = RecipeConfig("default", detector.path, enrollment=enrollment, calibration=calibration_file,
                              quantile=quantile)
        measured = Recipe(config, detector, policy=DecisionPolicy()).remeasure()
        click.echo(("threshold: " if measured.policy else "threshold not measured: ") + measured.message, err=True)
