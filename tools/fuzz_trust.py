"""mrad fuzz-trust: a signed line changed in one hostile way per case, loaded where a trusted key is required.

    python -m mrad.tools.fuzz_trust --bundle B --cases 200 --seed 0

A signed line is made once from ``--bundle``: the bundle signed by a release
key, two enrollment versions saved and signed by the line's key, and a
calibration measured on them and signed too. Each case copies it and changes
one thing that decides verdicts, the way someone with write access to the
line's folders could: enrollment keys with every hash rewritten (its
``enrollment.json`` and ``HEAD``), fusion weights or labels in
``enrollment.json``, a version folder replaced by a link to a copy outside, a
signature removed, copied from another version or forged with a stranger's
key, a new unsigned version made current, a calibration's threshold raised
(its signature kept, removed or forged), a bundle file or its encoder changed
with the manifest rehashed. Each changed line is loaded in a worker process
(:mod:`mrad.tools.fuzz`'s) as a line would load it, with both public keys
trusted: the bundle, the enrollment version in use and the calibration.

Outcomes: ``refused`` (an MradError), ``tampered accepted`` (a changed line
loaded: a failure), ``crash``, ``hang``, ``memory``, ``other exception``
(failures too). Every eighth case is the line unchanged, which must load
(``control refused`` is a failure: a harness that refuses everything proves
nothing). Exit 1 on any failure. Needs the 'sign' extra.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from mrad.runtime.commands.common import command
from mrad.tools.fuzz import MEMORY_LIMIT_MB, OUTSIDE_NAME, TIME_LIMIT_S, Worker

FAILURES = ("tampered accepted", "control refused", "crash", "hang", "memory", "other exception")
CONTROL_EVERY = 8

WORKER = r"""
import json, resource, sys
limit = int(sys.argv[1]) * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
from mrad.runtime import Detector, MradError
from mrad.runtime.formats import calibration
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    case = json.loads(line)
    try:
        detector = Detector(case["bundle"], provider="cpu", trusted_keys=case["trusted_keys"])
        measured = calibration.load(case["calibration"], detector.path, detector.retrieval, detector.trusted_keys,
                                    detector.line_memory.store.bundle_sha)
        result = detector.predict(case["image"])
        answer = {"outcome": "accepted", "score": result.score, "threshold": measured.threshold,
                  "enrollment": detector.enrollment_version}
    except MradError as exc:
        answer = {"outcome": "refused", "type": type(exc).__name__, "message": str(exc)[:300]}
    except MemoryError as exc:
        answer = {"outcome": "memory", "type": "MemoryError", "message": str(exc)[:300]}
    except Exception as exc:
        answer = {"outcome": "other exception", "type": type(exc).__name__, "message": str(exc)[:300]}
    print(json.dumps(answer), flush=True)
"""


def key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A P-256 private key and its public key, as PEM files ``<name>.pem`` and ``<name>.pub`` in ``folder``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    private_path, public_path = Path(folder) / f"{name}.pem", Path(folder) / f"{name}.pub"
    private_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


@dataclass(frozen=True)
class Keys:
    release: tuple[Path, Path]  # signs the bundle
    line: tuple[Path, Path]  # signs enrollment versions and calibrations
    stranger: tuple[Path, Path]  # trusted by nobody: forgeries

    @property
    def trusted(self) -> list[str]:
        return [str(self.release[1]), str(self.line[1])]


def signed_line(bundle: Path, folder: Path, keys: Keys, images: list) -> Path:
    """``folder/line``: ``bundle/`` (signed, with two signed enrollment versions) and its signed calibration."""
    from mrad.runtime import Detector
    from mrad.runtime.core import signing
    from mrad.runtime.formats import calibration

    line = Path(folder) / "line"
    shutil.copytree(bundle, line / "bundle", ignore=shutil.ignore_patterns("enrollment", "model.sig"))
    signing.sign(line / "bundle", keys.release[0])
    detector = Detector(line / "bundle", provider="cpu", trusted_keys=keys.trusted,
                        signer=signing.Signer(keys.line[0]))
    detector.line_memory.enroll(images[:2], "normal", names=["good-0", "good-1"])
    detector.line_memory.enroll(images[2:3], "normal", names=["good-2"])
    scores = [detector.predict(image).score for image in images]
    measured = calibration.calibrate(scores, 0.99, detector.retrieval, detector.path, detector.enrollment_version)
    calibration.save(measured, calibration.default_path(detector.path), detector.line_memory.signer)
    return line


# -- the changes ------------------------------------------------------------------------------------


def _head(line: Path) -> dict:
    return json.loads((line / "bundle" / "enrollment" / "HEAD").read_text())


def _current(line: Path) -> Path:
    return line / "bundle" / "enrollment" / f"v{_head(line)['version']:06d}"


def _rehash_head(line: Path, version_folder: Path, number: int | None = None) -> None:
    """What anyone who can write the folder can do: HEAD's hash of a version's manifest made to match it."""
    head = _head(line)
    number = number if number is not None else int(version_folder.name[1:])
    head.setdefault("sha256", {})[str(number)] = hashlib.sha256((version_folder / "enrollment.json").read_bytes()).hexdigest()
    (line / "bundle" / "enrollment" / "HEAD").write_text(json.dumps(head))


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "enrollment.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _sign(target: Path, signature: Path, private: Path, ignored=()) -> None:
    from mrad.runtime.core import signing

    signature.unlink(missing_ok=True)
    signing.Signer(private).sign(target, signature, ignored)


def _weights(rng: random.Random):
    """A change of fusion weights that always changes one (shifted by a quarter to three quarters, modulo 1)."""
    def change(manifest: dict) -> None:
        name = rng.choice(["map_weight", "image_weight"])
        manifest["settings"][name] = round((manifest["settings"][name] + 0.25 + 0.5 * rng.random()) % 1.0, 3)
        manifest["settings"]["dual_temperature"] = rng.choice([manifest["settings"]["dual_temperature"], 0.01, 5.0])
    return change


def enrollment_keys_rehashed(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)
    name = rng.choice(sorted(p.name for p in version.glob("*.npy")))
    array = np.load(version / name)
    if not array.size:  # an empty level gains an entry
        array = np.ones((1,) + array.shape[1:], array.dtype)
    elif array.dtype == np.float32:
        array = -array  # each entry now sits opposite where it was (a unit vector still)
    else:
        array = np.bitwise_xor(array, 1)  # every owner another source
    np.save(version / name, array, allow_pickle=False)
    if rng.random() < 0.3:  # caught where the file is read, on the bytes read
        return f"enrollment {version.name}/{name} changed, nothing rehashed"
    _edit_manifest(version, lambda m: m["files"].__setitem__(name, hashlib.sha256((version / name).read_bytes()).hexdigest()))
    _rehash_head(line, version)
    return f"enrollment {version.name}/{name} changed, enrollment.json and HEAD rehashed"


def enrollment_weights(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)
    _edit_manifest(version, _weights(rng))
    if rng.random() < 0.7:
        _rehash_head(line, version)
        return f"enrollment {version.name}: fusion weights changed, HEAD rehashed"
    return f"enrollment {version.name}: fusion weights changed"


def enrollment_relabelled(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)

    def change(manifest: dict) -> None:
        for source in manifest["sources"]:
            source["label"] = "defect"
    _edit_manifest(version, change)
    _rehash_head(line, version)
    return f"enrollment {version.name}: its sources relabelled, HEAD rehashed"


def version_linked_out(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)
    outside = line.parent / f"outside-{version.name}"
    shutil.move(version, outside)
    if rng.random() < 0.5:
        _edit_manifest(outside, _weights(rng))
        _rehash_head(line, outside, int(version.name[1:]))
    version.symlink_to(outside, target_is_directory=True)
    return f"enrollment {version.name}: a link to a copy outside the enrollment folder"


def enrollment_unsigned(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)
    (version / "enrollment.sig").unlink()
    _edit_manifest(version, _weights(rng))
    _rehash_head(line, version)
    return f"enrollment {version.name}: signature removed, weights changed, HEAD rehashed"


def enrollment_forged(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)
    _edit_manifest(version, _weights(rng))
    _rehash_head(line, version)
    _sign(version, version / "enrollment.sig", keys.stranger[0], ("enrollment.sig",))
    return f"enrollment {version.name}: weights changed, signed again by a stranger's key"


def enrollment_signature_of_another(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)
    other = version.with_name(f"v{int(version.name[1:]) - 1:06d}")
    shutil.copy(other / "enrollment.sig", version / "enrollment.sig")
    _edit_manifest(version, _weights(rng))
    _rehash_head(line, version)
    return f"enrollment {version.name}: weights changed, the signature of {other.name} put in its place"


def new_unsigned_version(line: Path, rng: random.Random, keys: Keys) -> str:
    version = _current(line)
    number = int(version.name[1:]) + 1
    made = version.with_name(f"v{number:06d}")
    shutil.copytree(version, made, ignore=shutil.ignore_patterns("enrollment.sig"))

    def change(manifest: dict) -> None:
        manifest.update(version=number, parent=number - 1)
        _weights(rng)(manifest)
    _edit_manifest(made, change)
    head = _head(line)
    head["version"] = number
    (line / "bundle" / "enrollment" / "HEAD").write_text(json.dumps(head))
    _rehash_head(line, made)
    return f"a new unsigned version {made.name}, weights changed, made current"


def _calibration(line: Path) -> Path:
    return line / "bundle.calibration.json"


def _raise_threshold(line: Path, rng: random.Random) -> float:
    path = _calibration(line)
    document = json.loads(path.read_text())
    document["threshold"] = rng.choice([0.99, 1.0, document["threshold"] + 1e-6, 0.5])
    path.write_text(json.dumps(document, indent=2) + "\n")
    return document["threshold"]


def calibration_threshold(line: Path, rng: random.Random, keys: Keys) -> str:
    return f"calibration threshold set to {_raise_threshold(line, rng)}, its signature kept"


def calibration_unsigned(line: Path, rng: random.Random, keys: Keys) -> str:
    threshold = _raise_threshold(line, rng)
    Path(str(_calibration(line)) + ".sig").unlink()
    return f"calibration threshold set to {threshold}, its signature removed"


def calibration_forged(line: Path, rng: random.Random, keys: Keys) -> str:
    threshold = _raise_threshold(line, rng)
    path = _calibration(line)
    _sign(path, Path(str(path) + ".sig"), keys.stranger[0])
    return f"calibration threshold set to {threshold}, signed again by a stranger's key"


def bundle_file_rehashed(line: Path, rng: random.Random, keys: Keys) -> str:
    bundle = line / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    name = rng.choice(sorted(manifest["files"]))
    data = bytearray((bundle / name).read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    (bundle / name).write_bytes(bytes(data))
    if rng.random() < 0.3:  # caught where the file is read, on the bytes read
        return f"bundle {name}: a bit flipped, manifest left"
    manifest["files"][name] = hashlib.sha256(bytes(data)).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if rng.random() < 0.3:
        _sign(bundle, bundle / "model.sig", keys.stranger[0], ("model.sig", "enrollment", ".lock"))
        return f"bundle {name}: a bit flipped, manifest rehashed, signed again by a stranger's key"
    return f"bundle {name}: a bit flipped, manifest rehashed"


def bundle_unsigned(line: Path, rng: random.Random, keys: Keys) -> str:
    (line / "bundle" / "model.sig").unlink()
    return "bundle signature removed"


CHANGES = (enrollment_keys_rehashed, enrollment_weights, enrollment_relabelled, version_linked_out,
           enrollment_unsigned, enrollment_forged, enrollment_signature_of_another, new_unsigned_version,
           calibration_threshold, calibration_unsigned, calibration_forged, bundle_file_rehashed, bundle_unsigned)


def verdict(answer: dict, tampered: bool) -> str:
    outcome = answer["outcome"]
    if outcome == "accepted":
        return "tampered accepted" if tampered else "accepted"
    if outcome == "refused":
        return "control refused" if not tampered else "refused"
    return outcome


# -- the run ----------------------------------------------------------------------------------------


@command("fuzz-trust")
@click.option("--bundle", required=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="A bundle whose encoder can feed enrollment (format 2 or later).")
@click.option("--cases", default=len(CHANGES) * 4, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True)
@click.option("--time-limit", default=TIME_LIMIT_S, show_default=True, type=click.FloatRange(min=1),
              help="Seconds one case may take.")
@click.option("--memory-mb", default=MEMORY_LIMIT_MB, show_default=True, type=click.IntRange(min=256),
              help="Address-space limit of the worker.")
@click.option("--failures", type=click.Path(path_type=Path, file_okay=False), default=Path("fuzz-trust-failures"),
              show_default=True, help="Where the changed lines that were accepted are copied for reproduction.")
@click.option("--verbose", is_flag=True, help="One line per case: what was changed and the outcome.")
def main(bundle, cases, seed, time_limit, memory_mb, failures, verbose):
    """Hostile changes to a signed line's bundle, enrollment and calibration; each must be refused."""
    counts: Counter = Counter()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mrad-fuzz-trust-") as scratch:
        scratch = Path(scratch)
        keys = Keys(*(key_pair(scratch, name) for name in ("release", "line", "stranger")))
        images = [np.random.default_rng(i).integers(0, 256, (96, 112, 3), dtype=np.uint8) for i in range(4)]
        line = signed_line(bundle, scratch / "made", keys, images)
        image = scratch / "frame.png"
        from PIL import Image

        Image.fromarray(images[3]).save(image)
        worker = Worker(memory_mb, scratch / OUTSIDE_NAME, script=WORKER)
        try:
            for i in range(cases):
                rng = random.Random(f"{seed}-trust-{i}")
                case_folder = scratch / "case"
                shutil.rmtree(case_folder, ignore_errors=True)
                copy = shutil.copytree(line, case_folder / "line", symlinks=True)
                tampered = i % CONTROL_EVERY != CONTROL_EVERY - 1
                change = CHANGES[(i - i // CONTROL_EVERY) % len(CHANGES)]
                what = change(copy, rng, keys) if tampered else "unchanged (control)"
                case = {"bundle": str(copy / "bundle"), "calibration": str(_calibration(copy)),
                        "trusted_keys": keys.trusted, "image": str(image)}
                answer = worker.run(case, time_limit)
                result = verdict(answer, tampered)
                counts[result] += 1
                if verbose:
                    click.echo(f"trust {i}: {what}: {result} {answer.get('message', '')[:160]}", err=True)
                if result in FAILURES:
                    target = Path(failures) / f"trust-{i:06d}"
                    shutil.copytree(case_folder, target, symlinks=True, dirs_exist_ok=True)
                    (target / "case.json").write_text(json.dumps({"what": what, "answer": answer}, indent=1) + "\n")
        finally:
            worker.stop()
    failed = sum(counts[f] for f in FAILURES)
    click.echo("  ".join(f"{outcome}: {counts.get(outcome, 0)}" for outcome in ("refused", "accepted", *FAILURES)))
    click.echo(f"{cases} trust cases in {time.perf_counter() - started:.0f} s; failures: {failed}"
               + (f" (inputs in {failures})" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
