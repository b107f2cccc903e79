"""mrad-enroll: teach a bundle the line's own good parts and defects, without re-export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
from tqdm import tqdm

from . import defaults
from .cli import bundle_option, command, enrollment_option, provider_option
from .detector import Detector
from .enrollment import AUGMENTATIONS, EnrollmentManifest
from .errors import MradError
from .sources import IMAGE_SUFFIXES, expand_inputs

EXAMPLES = """
\b
Examples:
  # good parts of the product on this line (the more views, the better)
  mrad-enroll --bundle bundles/visa-tf --normal 'good/*.png'
\b
  # defects an operator flagged, with their masks (matched by name: 007.png <- 007_mask.png or 007.png)
  mrad-enroll --bundle bundles/visa-tf --defect 'ng/*.png' --masks 'ng_masks/*.png'
\b
  # what is enrolled, undo the last enrollment, start over
  mrad-enroll --bundle bundles/visa-tf --list
  mrad-enroll --bundle bundles/visa-tf --rollback
  mrad-enroll --bundle bundles/visa-tf --clear
\b
Each enrollment is a new version beside the bundle (<bundle>/enrollment/); mrad-run, mrad-eval
and Detector use the current one. Scores change with an enrollment: calibrate again afterwards.
Settings (--scales, --cap, --augment, --exact-below) are fixed by the first enrollment after a
--clear; the fusion weights and the dual temperature can change at any time.
"""


def _images(patterns: tuple[str, ...], what: str) -> list[Path]:
    found = [p for p in expand_inputs(patterns, what) if p.suffix.lower() in IMAGE_SUFFIXES]
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
    return (f"version {manifest.version}{' (current)' if current else ''}, {manifest.created}, {manifest.action}: "
            f"{counts['normal_images']} normal images ({counts[f'normal/{scale}']} patches per scale), "
            f"{counts['defect_images']} defect images ({counts[f'defect/{scale}']} defect patches per scale); "
            f"map weight {manifest.settings.map_weight}, image weight {manifest.settings.image_weight}")


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
@bundle_option
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
@provider_option
@click.option("--batch", default=8, show_default=True, type=click.IntRange(min=1), help="Images per encoder call.")
def main(bundle, normal, defect, masks, list_versions, rollback, clear, enrollment, map_weight, image_weight,
         dual_temperature, scales, augment, cap, exact_below, provider, batch):
    """Enroll the line's own good parts and defects into a bundle's memories (no torch, no re-export)."""
    given = {k: v for k, v in dict(map_weight=map_weight, image_weight=image_weight, dual_temperature=dual_temperature,
                                   scales=scales, augment=augment, cap=cap, exact_below=exact_below).items()
             if v is not None}
    actions = [bool(normal or defect or (given and not clear)), list_versions, rollback, clear]
    if sum(actions) != 1:
        raise MradError("pass images to enroll (--normal and/or --defect) or settings to change, or one of --list, "
                        "--rollback, --clear")
    if masks and not defect:
        raise MradError("--masks belong to --defect images; pass --defect too")
    detector = Detector(bundle, provider=provider, enrollment=enrollment)
    if list_versions:
        head = detector.enrollments.head()
        versions = detector.enrollments.versions()
        if not versions:
            click.echo("nothing enrolled")
        for manifest in versions:
            click.echo(describe(manifest, manifest.version == head))
        if head is None and versions:
            click.echo("current: nothing enrolled (cleared or rolled back past the first version)")
        return
    if rollback:
        click.echo(f"now: {describe(detector.rollback_enrollment(), True)}")
        return
    current = detector.target_memory.settings
    if clear:
        click.echo(f"now: {describe(detector.clear_enrollment(dataclasses.replace(current, **given).checked()), True)}")
        return
    settings = dataclasses.replace(current, **given).checked()
    if settings != current:
        detector.enrollment_settings(settings, save=False)  # refuses changes that need a --clear
    if not (normal or defect):
        click.echo(f"now: {describe(detector.save_enrollment('settings'), True)}")
        return
    normals, defects = _images(normal, "--normal"), _images(defect, "--defect")
    paired = pair_masks(defects, _images(masks, "--masks")) if masks else [None] * len(defects)
    with tqdm(total=len(normals) + len(defects), desc="enrolling", unit="img") as bar:
        for label, images, chosen in (("normal", normals, None), ("defect", defects, paired)):
            if images:
                done = bar.n
                detector.enroll(images, label, masks=chosen, save=False, batch=batch,
                                progress=lambda n, done=done: bar.update(done + n - bar.n))
    manifest = detector.save_enrollment()
    unmasked = sum(1 for m in paired if m is None)
    click.echo(f"enrolled {len(normals)} normal and {len(defects)} defect images"
               + (f" ({unmasked} defects without a mask: image-level only)" if defects and unmasked else ""), err=True)
    if not detector.target.active:
        click.echo("warning: no normal part is enrolled yet; defects sharpen a normal memory and are not used "
                   "until good parts are enrolled (--normal)", err=True)
    click.echo(f"now: {describe(manifest, True)}")
