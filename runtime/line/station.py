"""One inspection station: its recipes (one per product), the active one, and changeover while running.

    >>> from mrad.runtime import Station
    >>> station = Station("station.toml")         # loads every recipe; a bad file -> MradError naming the key
    >>> station.recipes                           # names, in file order
    ['part-a', 'part-b']
    >>> station.activate("part-b")                # takes effect from the next frame
    >>> result = station.predict("frame.png")     # a path, a PIL image, an HxWx3 uint8 RGB array, or bytes
    >>> result.recipe, result.score, result.decision, result.anomaly_map.shape
    ('part-b', 0.4132, 'normal', (480, 640))
    >>> result.scored_by                          # what judged it
    {'bundle': 'sha256:5f1c...', 'enrollment': 3, 'calibration': '9a0e41c2b7d1', 'threshold': 0.47, ...}

A recipe (:class:`Recipe`) is a product: a bundle's detector with its
enrollment, its decision policy (:mod:`.policy`), its region of interest
(:mod:`.region`) and the names its results carry to the plant. Every recipe
is loaded when the station opens, so a changeover costs no load; recipes
whose bundles hold the same encoder graph (same sha256) share one inference
session (:class:`~mrad.runtime.core.graphs.SessionPool`): N products on one
backbone cost about one encoder plus N memories.

The station owns which recipe is active; each recipe owns its policy and
(through its detector) its enrollment. Every other part asks them: the
operator's page, a PLC, MQTT and the command line are callers of
:meth:`Station.activate`, :meth:`Recipe.enroll`, :meth:`Recipe.set_threshold`,
never writers of their fields. A batch reads the active recipe once and its
policy once, so no frame is scored by a half-switched recipe.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import defaults
from ..core import signing
from ..core.detector import Detector
from ..core.graphs import Providers, SessionPool
from ..core.preprocess import ImageLike, Prepared, load_rgb
from ..core.result import Result
from ..errors import MradError
from ..formats import calibration
from ..formats.station import RecipeConfig, StationConfig, read_station
from ..memories.objects import count_range
from ..memories.trials import MIN_CALIBRATION_PARTS, enrolled_parts
from .policy import DecisionPolicy, measured, policy_for
from .records import event_record
from .region import Placement, Region, on_frame


@dataclass(frozen=True)
class Staged:
    """A frame made ready for one recipe ahead of scoring (in a reader thread): scored by another, it is made again."""

    recipe: str
    prepared: Prepared
    placement: Placement | None  # where the recipe's region sat in the frame
    image: Any  # the frame as given


@dataclass(frozen=True)
class Measured:
    """What enrolling did to the policy: the new one (None: kept) and a line for people."""

    policy: DecisionPolicy | None
    message: str


class Recipe:
    """One product: a detector, its decision policy, its region of interest and its names for the plant."""

    def __init__(self, config: RecipeConfig, detector: Detector, threshold_origin: str = "station file",
                 policy: DecisionPolicy | None = None):
        self.config, self.detector, self.name = config, detector, config.name
        self.region = Region(config.roi, config.ignore) if config.roi is not None else None
        self.plant = dict(config.plant)
        self.quantile = config.quantile if config.quantile is not None else calibration.DEFAULT_QUANTILE
        self.calibration_path = (Path(config.calibration) if config.calibration
                                 else calibration.default_path(detector.path, config.enrollment))
        bundle_sha = detector.line_memory.store.bundle_sha  # the manifest as the detector loaded it (signed, or read)
        self.bundle_digest = "sha256:" + bundle_sha[:16]
        self._policy = policy or policy_for(detector.path, detector.retrieval, config.threshold,
                                            self.calibration_path if config.calibration else None, threshold_origin,
                                            default=self.calibration_path, trusted_keys=detector.trusted_keys,
                                            bundle_sha=bundle_sha)
        self._changing = threading.RLock()  # one change at a time: enroll, rollback, threshold

    @classmethod
    def open(cls, config: RecipeConfig, sessions: SessionPool | None = None, provider: Providers = "auto",
             session_options=None, max_pixels: int = defaults.MAX_IMAGE_PIXELS, verify: bool = True,
             threshold_origin: str = "station file") -> "Recipe":
        detector = Detector(config.bundle, provider=provider, retrieval=config.retrieval, verify=verify,
                            session_options=session_options, enrollment=config.enrollment,
                            trusted_keys=config.trusted_keys, max_pixels=max_pixels, sessions=sessions,
                            signer=signing.Signer.from_environment(config.sign_key))
        return cls(config, detector, threshold_origin)

    @property
    def policy(self) -> DecisionPolicy:
        return self._policy

    @property
    def threshold_stale(self) -> bool:
        return self._policy.stale(self.detector.enrollment_version)

    # -- scoring ---------------------------------------------------------------------------------

    def prepare(self, image: ImageLike) -> Staged:
        """Decode, cut to the region and preprocess ``image`` for this recipe."""
        placement = None
        if self.region is not None:
            cut, placement = self.region.cut(np.asarray(load_rgb(image, self.detector.max_pixels)))
            prepared = self.detector.prepare(cut)
        else:
            prepared = self.detector.prepare(image)
        return Staged(self.name, prepared, placement, image)

    def score(self, staged: Sequence[Staged], evidence: bool = False) -> list[Result]:
        """Score frames staged for this recipe; each result decided by one policy and named after what scored it."""
        policy, state = self._policy, self.detector.enrolled  # each read once: the batch is scored and named by them
        enrollment = state.version
        results = self._counted(self.detector.predict_batch([s.prepared for s in staged], evidence=evidence,
                                                            enrolled=state), state)
        scored_by = {"bundle": self.bundle_digest, "enrollment": enrollment, "calibration": policy.calibration,
                     "threshold": policy.threshold}
        if policy.stale(enrollment):
            scored_by["threshold_stale"] = True
        if self.plant:
            scored_by["plant"] = self.plant
        return [replace(on_frame(r, s.placement) if s.placement is not None else r, recipe=self.name,
                        decision=policy.decide(r), scored_by=scored_by) for r, s in zip(results, staged)]

    def _counted(self, results: list[Result], state) -> list[Result]:
        """Part counts judged with the recipe's own tolerance, when it sets one (else the enrollment's)."""
        objects = state.objects
        if self.config.count_tolerance is None or objects is None or not objects.counts:
            return results
        low, high = count_range(objects.counts, self.config.count_tolerance)
        return [replace(r, object_count_ok=low <= len(r.objects) <= high) if r.objects is not None else r
                for r in results]

    # -- changes, one at a time --------------------------------------------------------------------

    def set_threshold(self, value: float, origin: str) -> DecisionPolicy:
        """A threshold set by hand (the page, a PLC): fixed, never stale, for this run."""
        with self._changing:
            self._policy = DecisionPolicy(float(value), origin, fixed=True)
            return self._policy

    def enroll(self, images: Sequence[ImageLike], label: str = "normal", **options) -> tuple[Any, Measured]:
        """Enroll images (:meth:`Detector.enroll` takes ``options``), then measure the threshold again when enough
        good parts are enrolled (a defect changes the good parts' scores too: the dual memory raises what lies
        near it); returns the enrollment manifest and what happened to the policy."""
        with self._changing:
            manifest = self.detector.line_memory.enroll(images, label, **options)
            return manifest, self.remeasure()

    def rollback(self):
        """Go back to the enrollment before the current one (the policy stays; it may now be stale)."""
        with self._changing:
            return self.detector.line_memory.rollback()

    def remeasure(self, quantile: float | None = None, origin: str | None = None,
                  minimum: int = MIN_CALIBRATION_PARTS, fixed_too: bool = False) -> Measured:
        """The threshold from the enrolled good parts (each held out), written to the recipe's calibration file.

        Needs ``minimum`` parts that are files (by default
        :data:`~mrad.runtime.memories.trials.MIN_CALIBRATION_PARTS`, for an
        operator who asks explicitly fewer); below that the previous policy
        stays. A fixed threshold stays in force (unless ``fixed_too``); the
        calibration is written for later runs either way.
        """
        quantile = self.quantile if quantile is None else quantile
        # where a trusted key is required the threshold is signed as it is written: no signer, no measuring
        signer = signing.require_signer(self.detector.trusted_keys, self.detector.line_memory.signer, "a calibration")
        with self._changing:
            target = self.detector.target_memory
            parts = enrolled_parts(target)
            if len(parts) < max(1, minimum):
                return self._kept(f"{len(parts)} good parts are enrolled as files; the threshold is measured from "
                                  f"{minimum} on (enroll more good parts, or run mrad-calibrate)")
            scores = self.detector.line_memory.held_out_scores([(part, [part]) for part in parts])
            result = calibration.calibrate(scores, quantile, self.detector.retrieval, self.detector.path,
                                           self.detector.enrollment_version)
            calibration.save(result, self.calibration_path, signer)
            message = (f"threshold {result.threshold:.6f} measured on {len(parts)} enrolled good parts, each held out "
                       f"(quantile {quantile}), written to {self.calibration_path}")
            if self._policy.fixed and not fixed_too:
                return Measured(None, message + f"; the fixed threshold {self._policy.threshold} stays in force")
            self._policy = measured(result, self.calibration_path,
                                    origin or f"{self.calibration_path} (measured on enrolling)")
            return Measured(self._policy, message)

    def _kept(self, why: str) -> Measured:
        policy = self._policy
        if policy.threshold is None:
            return Measured(None, f"{why}; no threshold yet: records carry scores only")
        stale = " (now stale: it was measured with another enrollment)" if self.threshold_stale else ""
        return Measured(None, f"{why}; the threshold {policy.threshold:.6f} stays{stale}")


class Station:
    """The recipes of one station, every one loaded, one active; see the module's examples.

    ``station``: a station file's path, or a :class:`StationConfig`.
    ``recipe``: the recipe active at start (default: the file's ``active``,
    else its first). ``provider``: as :class:`Detector` takes it (default:
    the file's, else "auto"). ``progress(name)`` is called as each recipe
    starts to load.
    """

    def __init__(self, station: str | Path | StationConfig, recipe: str | None = None,
                 provider: Providers | None = None, session_options=None, verify: bool = True,
                 max_pixels: int = defaults.MAX_IMAGE_PIXELS, progress: Callable[[str], None] | None = None):
        config = station if isinstance(station, StationConfig) else read_station(station)
        self.config = config
        self.sessions = SessionPool()
        provider = provider or config.provider or "auto"
        start = recipe or config.active or config.recipes[0].name
        if start not in config.names:
            raise MradError(f"{config.where}: no recipe named {start[:64]!r}; the recipes are {', '.join(config.names)}")
        self._recipes: dict[str, Recipe] = {}
        for entry in config.recipes:
            if progress:
                progress(entry.name)
            try:
                self._recipes[entry.name] = Recipe.open(entry, self.sessions, provider, session_options, max_pixels,
                                                        verify)
            except MradError as exc:
                raise type(exc)(f"recipe {entry.name!r}: {exc}") from exc
        self._active = self._recipes[start]
        self._listeners: list[Callable[[dict], None]] = []
        self._switching = threading.Lock()

    @classmethod
    def of(cls, recipe: Recipe, name: str = "line") -> "Station":
        """A station of one recipe already opened (mrad-run --bundle, a bench, a test)."""
        station = cls.__new__(cls)
        station.config = StationConfig(recipes=(recipe.config,), name=name)
        station.sessions = SessionPool()
        station._recipes = {recipe.name: recipe}
        station._active = recipe
        station._listeners, station._switching = [], threading.Lock()
        return station

    @classmethod
    def single(cls, detector: Detector, threshold: float | None = None, calibration_file: Path | None = None,
               name: str = "default", roi=None, ignore: tuple = ()) -> "Station":
        """A station of one recipe around an open detector, its policy as mrad-run's flags give it."""
        config = RecipeConfig(name=name, bundle=detector.path, calibration=calibration_file, threshold=threshold,
                              retrieval=detector.retrieval, roi=roi, ignore=ignore)
        return cls.of(Recipe(config, detector, threshold_origin="--threshold"))

    # -- asking -----------------------------------------------------------------------------------

    @property
    def recipes(self) -> list[str]:
        """The recipes' names, in the file's order."""
        return list(self._recipes)

    @property
    def active(self) -> str:
        return self._active.name

    def recipe(self, name: str | None = None) -> Recipe:
        """A recipe by name (default: the active one)."""
        if name is None:
            return self._active
        if name not in self._recipes:
            raise MradError(f"no recipe named {name[:64]!r}; the recipes are {', '.join(self._recipes)}")
        return self._recipes[name]

    # -- changeover ----------------------------------------------------------------------------

    def on_change(self, listener: Callable[[dict], None]) -> Callable[[], None]:
        """Call ``listener`` with a ``recipe_changed`` event record at every changeover; returns what stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def activate(self, name: str, by: str = "api") -> None:
        """Make ``name`` the active recipe from the next frame scored; ``by`` says who asked (for the records)."""
        if not isinstance(name, str):
            raise MradError(f"a recipe is named by a string, got {type(name).__name__}")
        recipe = self.recipe(name)
        with self._switching:
            before, self._active = self._active.name, recipe
        if before != name:
            record = event_record("recipe_changed", recipe=name, previous=before, by=by)
            for listener in list(self._listeners):
                listener(record)

    # -- scoring -------------------------------------------------------------------------------

    def prepare(self, image: ImageLike) -> Staged:
        """Make a frame ready for the active recipe (a reader thread's half of :meth:`predict_batch`)."""
        return self._active.prepare(image)

    def predict(self, image: ImageLike | Staged, evidence: bool = False) -> Result:
        """Score one image with the active recipe."""
        return self.predict_batch([image], evidence=evidence)[0]

    def predict_batch(self, images: Sequence[ImageLike | Staged], evidence: bool = False) -> list[Result]:
        """Score images with the active recipe, read once: the whole batch is one recipe's."""
        recipe = self._active
        staged = [item if isinstance(item, Staged) and item.recipe == recipe.name
                  else recipe.prepare(item.image if isinstance(item, Staged) else item) for item in images]
        return recipe.score(staged, evidence) if staged else []

    def counts_by_recipe(self) -> dict[str, dict]:
        """What each recipe is now: its threshold, where it came from, its enrollment version."""
        return {name: {"threshold": r.policy.threshold, "threshold_origin": r.policy.origin,
                       "enrollment": r.detector.enrollment_version, "threshold_stale": r.threshold_stale}
                for name, r in self._recipes.items()}
