"""The line's own memories of one bundle, and the one owner of every change to them.

:class:`LineMemory` enrolls good parts and defects (with the per-part
memory, when started), changes the fusion settings, clears, rolls back, and
starts unsaved trials (mrad-eval's). Each change is made on the side and
published as a new :class:`Enrolled`: an immutable state that replaces the
previous one whole, so that a batch, which reads the state once, sees all of
a change or none of it, and a rollback can never mix two versions. The
versions on disk are its :class:`~mrad.runtime.memories.enrollment.EnrollmentStore`'s.

It encodes with the detector it belongs to (its ``scorer``): the same
encoder, preprocessing, segmenter and crops that scoring uses.

Where trusted keys are required, it loads only versions signed by one of
them, and it signs every version it saves with its ``signer``; without a
signer it refuses to save one (the next load would refuse it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import defaults
from ..core import signing
from ..core.preprocess import ImageLike, load_rgb
from ..errors import MradError
from ..files import sha256_of
from .enrollment import (IMAGE_OUTPUT, LABELS, TOKENS_OUTPUT, EnrollmentManifest, EnrollmentSettings, EnrollmentStore,
                         MaskLike, ObjectMemory, Source, TargetMemory, prepared_shots)
from .objects import ObjectSettings, fit_background, open_segmenter, part_patches, part_weight

@dataclass(frozen=True)
class Enrolled:
    """What the line's own memories are at one moment: replaced whole, never changed, so that a batch reads
    one consistent state (an enrollment, a rollback or a trial on another thread replaces the reference)."""

    manifest: EnrollmentManifest | None = None  # the version on disk (None: nothing enrolled, or unsaved)
    target: TargetMemory | None = None  # None: the bundle's encoder cannot feed a target memory
    objects: ObjectMemory | None = None

    @property
    def version(self) -> int | None:
        """The enrollment version scoring with this state uses (None: zero-shot, nothing enrolled)."""
        return self.manifest.version if self.manifest is not None and self.target.active else None


class LineMemory:
    """The target memory (and per-part memory) of one detector's bundle, loaded from ``folder`` (default: the
    bundle's ``enrollment/``); the current version is loaded and, with ``verify``, checked.

    ``trusted_keys``: a version is loaded only with one of their signatures. ``signer``: signs each version saved
    (needed where trusted keys are, and its public key must be one of them). ``bundle_sha``: the sha256 of the
    bundle's manifest as the scorer loaded it (default: read from the bundle).
    """

    def __init__(self, scorer, folder: str | Path | None = None, verify: bool = True,
                 trusted_keys: tuple[Path, ...] = (), signer: signing.Signer | None = None,
                 bundle_sha: str | None = None):
        self._scorer = scorer
        if signer is not None:
            signer.check_trusted(trusted_keys, "an enrollment version")
        self._trusted_keys, self._signer = tuple(trusted_keys), signer
        self.store = EnrollmentStore(self._scorer.path, Path(folder) if folder else None, bundle_sha, trusted_keys)
        outputs = {o.name: o for o in self._scorer.manifest.graphs["encoder"].outputs}
        if IMAGE_OUTPUT not in outputs or TOKENS_OUTPUT not in outputs:
            if self.store.head() is not None:
                raise MradError(f"{self.store.root} holds an enrollment, but this bundle's encoder has no "
                                f"{TOKENS_OUTPUT} output; export the bundle again with this mrad-edge")
            self._enrolled, self._target_shape = Enrolled(), None
            return
        # What every target memory of this bundle is shaped by: patch grid, image feature and patch token sizes.
        self._target_shape = (self._scorer.manifest.scoring.grid, outputs[IMAGE_OUTPUT].shape[-1], outputs[TOKENS_OUTPUT].shape[-1])
        self._enrolled = Enrolled(*self.store.load(*self._target_shape, verify))
        if self.objects is not None:
            self.objects.segmenter()  # a segmenter file gone or changed says so now, not at the first frame

    @property
    def signer(self) -> signing.Signer | None:
        """The key the versions (and the thresholds measured on them) are signed with; None: unsigned."""
        return self._signer

    @property
    def state(self) -> Enrolled:
        """The line's memories now: read it once and use what it holds (it may be replaced meanwhile)."""
        return self._enrolled

    @property
    def enrollment(self) -> EnrollmentManifest | None:
        return self._enrolled.manifest

    @property
    def target(self) -> TargetMemory | None:
        return self._enrolled.target

    @property
    def objects(self) -> ObjectMemory | None:
        return self._enrolled.objects

    def _publish(self, **changes) -> None:
        self._enrolled = replace(self._enrolled, **changes)

    @property
    def enrollment_version(self) -> int | None:
        """The enrollment version scoring uses (None: zero-shot, nothing enrolled)."""
        return self._enrolled.version

    @property
    def target_memory(self) -> TargetMemory:
        """The live target memory; a bundle whose encoder cannot feed one says so."""
        if self.target is None:
            raise MradError(f"{self._scorer.path} cannot enroll: its encoder has no {TOKENS_OUTPUT} output (bundles exported "
                            "before enrollment existed); export the bundle again with this mrad-edge")
        return self.target

    def save(self, action: str = "enroll") -> EnrollmentManifest:
        """Write the live target memory as a new enrollment version and make it current."""
        state = self._enrolled
        manifest = self.store.commit(self.target_memory, action, state.objects, self._signer_for_saving())
        self._publish(manifest=manifest)
        return manifest

    def _signer_for_saving(self) -> signing.Signer | None:
        """The signer of the next version; asked before anything changes, so that a refused save changes nothing."""
        return signing.require_signer(self._trusted_keys, self._signer, "an enrollment version")

    def enroll(self, images: Sequence[ImageLike], label: str = "normal", masks: Sequence[MaskLike] | None = None,
               names: Sequence[str] | None = None, save: bool = True, batch: int = 8,
               progress=None, objects: str | Path | None = None,
               object_settings: ObjectSettings | None = None) -> EnrollmentManifest | None:
        """Add the line's own images to its memories; the next prediction uses them.

        ``label``: "normal" (good parts: every patch joins the normal memory at
        every scale) or "defect" (the patches inside its mask join the defect
        memory; without a mask the image counts as image-level evidence only).
        ``masks``: one per image (a file, an HxW array or None). ``names``: how
        the sources are recorded (default: the file names). With ``save``
        (the default) the enrollment is written as a new version beside the
        bundle and its manifest returned. ``progress``: called with the number
        of images done after each batch.

        ``objects``: "auto" or a SAM-family segmenter's ONNX file starts the
        per-part memory (:mod:`~mrad.runtime.memories.objects`) with these images
        (normal ones): each is segmented into parts, and each part's crop
        is encoded into it. Once started, every later normal image feeds it
        too. ``object_settings``: how parts are found, cropped and fused.
        """
        if label not in LABELS:
            raise MradError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
        if save:
            self._signer_for_saving()
        target = self.target_memory
        images = list(images)
        if objects is not None or object_settings is not None:
            if label != "normal":
                raise MradError("the per-part memory is built from normal images: pass objects with label 'normal'")
            self._start_objects(images, objects, object_settings)
        if masks is not None and len(masks) != len(images):
            raise MradError(f"{len(masks)} masks for {len(images)} images: pass one mask (or None) per image")
        if names is not None and len(names) != len(images):
            raise MradError(f"{len(names)} names for {len(images)} images")
        side, grid = self._scorer.manifest.preprocess.image_size, self._scorer.manifest.scoring.grid
        for start in range(0, len(images), batch):
            chosen = range(start, min(start + batch, len(images)))
            shots = [shot for i in chosen for shot in prepared_shots(
                images[i], label, masks[i] if masks is not None else None,
                names[i] if names is not None else _source_name(images[i], i), target.settings.augment, side, grid,
                self._scorer.max_pixels)]
            encoded = self._scorer.encode(self._scorer.preprocess([rgb for rgb, _, _ in shots]), [IMAGE_OUTPUT, TOKENS_OUTPUT])
            target.add(encoded[IMAGE_OUTPUT], encoded[TOKENS_OUTPUT], [source for _, source, _ in shots],
                       [groups for _, _, groups in shots], compact=False)
            if label == "normal" and self.objects is not None:
                self._enroll_parts([(np.asarray(rgb), source) for rgb, source, _ in shots])
            if progress:
                progress(chosen.stop)
        target.compact()  # once per enrollment, over old and new entries together
        if self.objects is not None:
            self.objects.memory.compact()
        return self.save() if save else None

    def _start_objects(self, images: Sequence[ImageLike], objects: str | Path | None,
                       settings: ObjectSettings | None) -> None:
        """Begin the per-part memory (or check that the one kept was made the same way)."""
        settings = settings or (self.objects.settings if self.objects is not None else ObjectSettings())
        if objects is not None:
            if str(objects) == "auto":
                settings = replace(settings, segmenter="auto", model=None, model_sha256=None)
            else:
                path = Path(objects)
                if not path.is_file():
                    raise MradError(f"--objects {objects}: give 'auto' or a SAM-family segmenter's .onnx file")
                settings = replace(settings, segmenter="onnx", model=str(path.resolve()), model_sha256=sha256_of(path))
        settings = settings.checked()
        if self.objects is not None and self.objects.memory.sources:
            self._publish(objects=self.objects.with_settings(self.target_memory.settings, settings))
            return
        background = None
        if settings.segmenter == "auto":
            background = fit_background([np.asarray(load_rgb(image, self._scorer.max_pixels)) for image in images])
        open_segmenter(settings, background)  # a bad segmenter file says so before any encoding
        self._publish(objects=ObjectMemory(settings, background,
                                           TargetMemory(self.target_memory.settings, *self._target_shape)))

    def _enroll_parts(self, shots: Sequence[tuple[np.ndarray, Source]]) -> None:
        """Segment enrolled normal shots, and add every part's crop to the per-part memory."""
        objects = self.objects
        found = self._scorer.segment([rgb for rgb, _ in shots], objects)
        crops, sources, kept = [], [], []
        for (rgb, source), parts in zip(shots, found):
            if not source.augment:
                objects.counts.append(len(parts))
            for j, part in enumerate(parts):
                image, mask, _ = self._scorer.crop(rgb, part, objects)
                crops.append(image)
                kept.append(part_patches(part_weight(mask), self._scorer.manifest.scoring.grid))
                sources.append(Source(name=f"{source.name}#{j}", label="normal", augment=source.augment))
        for start in range(0, len(crops), defaults.OBJECT_BATCH):
            chosen = slice(start, start + defaults.OBJECT_BATCH)
            encoded = self._scorer.encode(self._scorer.crop_inputs(crops[chosen]), [IMAGE_OUTPUT, TOKENS_OUTPUT])
            objects.memory.add(encoded[IMAGE_OUTPUT], encoded[TOKENS_OUTPUT], sources[chosen],
                               [None] * len(sources[chosen]), compact=False, patches=kept[chosen])

    def change_settings(self, settings: EnrollmentSettings, save: bool = True,
                            objects: ObjectSettings | None = None) -> EnrollmentManifest | None:
        """New settings for the current enrollment: only fusion weights and temperature once images are enrolled.

        ``objects``: new settings of the per-part memory (once parts are
        enrolled, only its fusion weights and count tolerance).
        """
        if save:
            self._signer_for_saving()
        target = self.target_memory.with_settings(settings)
        if objects is not None and self.objects is None:
            raise MradError("no per-part memory is enrolled: enroll normal images with objects='auto' (--objects) first")
        self._publish(target=target,
                      objects=self.objects.with_settings(settings, objects) if self.objects is not None else None)
        return self.save("settings") if save else None

    def start_trial(self, settings: EnrollmentSettings | None = None) -> TargetMemory:
        """Score with an empty, unsaved target memory (and no per-part memory) from now on; returns it.

        For trials such as mrad-eval's.
        """
        target = TargetMemory(settings or self.target_memory.settings, *self._target_shape)
        self._publish(target=target, objects=None)
        return target

    def clear(self, settings: EnrollmentSettings | None = None) -> EnrollmentManifest:
        """Forget every enrolled image (a new, empty version: --rollback brings the old one back)."""
        self._signer_for_saving()
        self.start_trial(settings or EnrollmentSettings())
        return self.save("clear")

    def rollback(self) -> EnrollmentManifest | None:
        """Go back to the version before the current one; returns it (None: nothing enrolled)."""
        _ = self.target_memory  # a bundle that cannot enroll says so here
        self.store.rollback()
        self._enrolled = Enrolled(*self.store.load(*self._target_shape))
        return self.enrollment

    def held_out_scores(self, trials: Sequence[tuple[ImageLike, Sequence[str]]]) -> list[float]:
        """Each image scored against the live enrollment without the entries of the sources named beside it
        (:mod:`~mrad.runtime.memories.trials` says why); an image with no names is scored as it is."""
        live = self.target_memory
        sources, levels = live.snapshot()
        largest = max((len(keys) for keys, _ in levels.values()), default=0)
        settings = replace(live.settings, exact_below=largest + 1)  # exact search: no index built per trial
        scores = []
        for image, names in trials:
            own = np.flatnonzero([source.name in names for source in sources])
            if not len(own):
                scores.append(self._scorer.predict(image).score)
                continue
            kept = {}
            for name, (keys, owners) in levels.items():
                others = ~np.isin(owners, own)
                kept[name] = (keys[others], owners[others])
            trial = TargetMemory.restored(settings, live.grid, live.image_dim, live.token_dim, sources, kept)
            scores.append(self._scorer.predict_batch([image], target=trial)[0].score)
        return scores


def _source_name(image: ImageLike, i: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return f"image-{i}"
