"""The line's own memories: enrolled, scored, persisted, rolled back, refused when tampered with."""

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mrad.runtime import BundleError, Detector, MradError

from mrad.runtime.commands import enroll as enroll_cli
from mrad.runtime.memories.enrollment import EnrollmentSettings, EnrollmentStore, TargetMemory, dual
from mrad.runtime.core.search import Nearest, greedy_coreset, nearest_exact, novel_swaps, pool_patches

POOL_TOLERANCE = 1e-5  # NumPy pooling against torch's avg_pool2d, float32 features of order 1
SMOOTHING_TOLERANCE = 1e-4  # the runtime's 1/3/5 pooling of the graph's tokens against the graph's own smoothing


def samples(synth_data, kind):
    root = synth_data[1]
    return {
        "train": sorted(root.glob("*/train/good/*.png")),
        "good": sorted(root.glob("*/test/good/*.png")),
        "defect": sorted(p for p in root.glob("*/test/*/*.png") if p.parent.name != "good"),
    }[kind]


def mask_of(image):
    category = image.parents[2]
    return category / "ground_truth" / image.parent.name / f"{image.stem}_mask.png"


@pytest.fixture
def detector(tf_bundle, tmp_path):
    return Detector(tf_bundle, provider="cpu", enrollment=tmp_path / "enrollment")


def scores_and_maps(detector, images):
    results = detector.predict_batch(images)
    return np.array([r.score for r in results]), np.stack([r.anomaly_map for r in results])


def test_pooling_matches_torch_and_the_graphs_smoothing(detector, target_images):
    tokens = np.random.default_rng(0).standard_normal((2, 64, 16)).astype(np.float32)
    for k in (1, 3, 5, 7):
        want = F.avg_pool2d(torch.from_numpy(tokens).transpose(1, 2).reshape(2, 16, 8, 8), k, stride=1, padding=k // 2)
        np.testing.assert_allclose(pool_patches(tokens, 8, k), want.flatten(2).transpose(1, 2).numpy(),
                                   atol=POOL_TOLERANCE)
    encoded = detector.encode(detector.preprocess([detector_rgb(p) for p in target_images[:2]]),
                              ["patch_feature", "patch_tokens"])
    mean = sum(pool_patches(encoded["patch_tokens"], 8, k) for k in (1, 3, 5)) / 3
    np.testing.assert_allclose(mean, encoded["patch_feature"], atol=SMOOTHING_TOLERANCE)


def detector_rgb(path):
    from mrad.runtime.core.preprocess import load_rgb

    return load_rgb(path)


def test_nothing_enrolled_gives_todays_scores_bit_for_bit(detector, target_images, synth_data):
    images = target_images[:6]
    encoded = detector.encode(detector.preprocess([detector_rgb(p) for p in images]))
    plain = detector.map_and_score(detector.retrieve(encoded), [(96, 112)] * len(images))
    scores, maps = scores_and_maps(detector, images)
    np.testing.assert_array_equal(scores, [r.score for r in plain])
    np.testing.assert_array_equal(maps, np.stack([r.anomaly_map for r in plain]))
    detector.line_memory.enroll(samples(synth_data, "train")[:2], "normal")
    assert not np.array_equal(scores_and_maps(detector, images)[0], scores)
    detector.line_memory.clear()
    cleared = scores_and_maps(detector, images)
    np.testing.assert_array_equal(cleared[0], scores)
    np.testing.assert_array_equal(cleared[1], maps)


def test_round_trip_restart_gives_the_same_scores(detector, tf_bundle, tmp_path, synth_data, target_images):
    defects = samples(synth_data, "defect")[:3]
    detector.line_memory.enroll(samples(synth_data, "train"), "normal")
    manifest = detector.line_memory.enroll(defects, "defect", masks=[mask_of(defects[0]), mask_of(defects[1]), None])
    assert manifest.version == 2 and manifest.parent == 1
    counts = manifest.counts()
    assert counts["normal_images"] == len(samples(synth_data, "train")) and counts["defect_images"] == 3
    assert counts["normal/patch_3"] == 64 * counts["normal_images"] and counts["defect/image"] == 3
    assert 0 < counts["defect/patch_1"] < 2 * 64, "only the patches inside the two masks join the defect memory"
    before = scores_and_maps(detector, target_images)
    restarted = Detector(tf_bundle, provider="cpu", enrollment=tmp_path / "enrollment")
    assert restarted.enrollment.version == 2
    after = scores_and_maps(restarted, target_images)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_rollback_and_clear(detector, synth_data, target_images):
    zero_shot = scores_and_maps(detector, target_images)[0]
    detector.line_memory.enroll(samples(synth_data, "train")[:2], "normal")
    one = scores_and_maps(detector, target_images)[0]
    detector.line_memory.enroll(samples(synth_data, "train")[2:], "normal")
    assert detector.line_memory.rollback().version == 1
    np.testing.assert_array_equal(scores_and_maps(detector, target_images)[0], one)
    assert detector.line_memory.clear().version == 3
    np.testing.assert_array_equal(scores_and_maps(detector, target_images)[0], zero_shot)
    assert detector.line_memory.rollback().version == 1, "a clear is undone like any enrollment"
    assert detector.line_memory.rollback() is None
    np.testing.assert_array_equal(scores_and_maps(detector, target_images)[0], zero_shot)
    with pytest.raises(MradError, match="nothing to roll back"):
        detector.line_memory.rollback()


def test_enrolled_defects_raise_their_kind(detector, synth_data):
    """Dual memory: a defect of an enrolled kind scores higher with the defect memory than without."""
    defects = [p for p in samples(synth_data, "defect") if p.parent.name == "blob"]
    detector.line_memory.enroll(samples(synth_data, "train"), "normal")
    held_out = defects[1::2]
    normal_only = [r.score for r in detector.predict_batch(held_out)]
    detector.line_memory.enroll(defects[::2], "defect", masks=[mask_of(p) for p in defects[::2]])
    with_defects = [r.score for r in detector.predict_batch(held_out)]
    assert np.mean(with_defects) > np.mean(normal_only)


def test_dual_formula():
    normal = np.array([0.1, 0.3, 0.3, 0.05], np.float32)
    defect = np.array([0.1, 0.05, 0.5, 0.4], np.float32)
    got = dual(normal, defect, 0.05)
    assert got[0] == pytest.approx(0.1), "as near a defect as a normal entry: unchanged"
    assert got[1] > 0.3 * 1.99, "much nearer a known defect: raised towards twice"
    assert got[2] == pytest.approx(0.3) and got[3] == pytest.approx(0.05), "unlike every defect: never lowered"
    np.testing.assert_array_equal(dual(normal, None, 0.05), normal)


def test_evidence_names_the_entries_that_weighed_most(detector, synth_data, target_images):
    zero_shot = detector.predict(target_images[0], evidence=True).evidence
    assert "enrolled" not in zero_shot and len(zero_shot["zero_shot"]["image"]) == 3
    assert {"weight", "label", "source", "category", "defect"} <= set(zero_shot["zero_shot"]["patch"][0])
    normals = samples(synth_data, "train")
    detector.line_memory.enroll(normals, "normal")
    evidence = detector.predict(target_images[0], evidence=True).evidence
    assert evidence["enrolled"]["image"]["normal"]["source"] in {str(p) for p in normals}
    assert evidence["enrolled"]["patch"]["normal"]["distance"] >= 0
    assert detector.predict(target_images[0]).evidence is None


def test_tampered_enrollment_is_refused(detector, tf_bundle, tmp_path, synth_data):
    folder = tmp_path / "enrollment"
    detector.line_memory.enroll(samples(synth_data, "train")[:2], "normal")
    keys = folder / "v000001" / "normal_patch_1_keys.npy"
    data = bytearray(keys.read_bytes())
    data[-1] ^= 1
    keys.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        Detector(tf_bundle, provider="cpu", enrollment=folder)
    keys.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    Detector(tf_bundle, provider="cpu", enrollment=folder)

    manifest_path = folder / "v000001" / "enrollment.json"
    original = manifest_path.read_text()
    raw = json.loads(original)
    raw["levels"]["normal/image"]["keys"] = "../../manifest.json"
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="not one of its own hashed files"):
        Detector(tf_bundle, provider="cpu", enrollment=folder)
    raw = json.loads(original)
    raw["files"]["../../manifest.json"] = "0" * 64
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="outside its own directory"):
        Detector(tf_bundle, provider="cpu", enrollment=folder)
    raw = json.loads(original)
    raw["settings"]["map_weight"] = 7
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="map_weight must lie in"):
        Detector(tf_bundle, provider="cpu", enrollment=folder)
    raw = json.loads(original)
    raw["bundle"] = "0" * 64
    manifest_path.write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="made with another bundle"):
        Detector(tf_bundle, provider="cpu", enrollment=folder)
    (folder / "HEAD").write_text("{not json")
    with pytest.raises(BundleError, match="HEAD cannot be read"):
        Detector(tf_bundle, provider="cpu", enrollment=folder)


def test_failed_commit_leaves_the_previous_version(detector, synth_data, monkeypatch, tmp_path):
    detector.line_memory.enroll(samples(synth_data, "train")[:2], "normal")

    def crash(*args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("mrad.runtime.memories.enrollment.os.replace", crash)
    with pytest.raises(MradError, match=r"cannot be written \(disk full \(simulated\)\); the version before stays"):
        detector.line_memory.enroll(samples(synth_data, "train")[2:], "normal")
    monkeypatch.undo()
    store = EnrollmentStore(detector.path, tmp_path / "enrollment")
    assert store.head() == 1 and [v.version for v in store.versions()] == [1]
    assert not list(store.root.glob(".v*")), "the half-written version is removed"


ENROLL_FOREVER = r"""
import sys
from mrad.runtime import Detector
from mrad.runtime.memories import enrollment

saving = enrollment.save_array


def announced(path, array, atomic=True):  # each array file of a version being written says so, then is written
    print("saving", path.name, flush=True)
    saving(path, array, atomic)


enrollment.save_array = announced
detector = Detector(sys.argv[1], provider="cpu", enrollment=sys.argv[2])
while True:
    detector.line_memory.enroll(sys.argv[3:], "normal")
"""


@pytest.mark.parametrize("files_written", [1, 7, 16, 20, 33])
def test_sigkill_during_enrollment_leaves_a_loadable_version(tf_bundle, tmp_path, synth_data, files_written):
    """Killed while a version's files are written (16 per version), or between versions: the last complete one loads."""
    folder = tmp_path / "enrollment"
    images = [str(p) for p in samples(synth_data, "train")]
    process = subprocess.Popen([sys.executable, "-c", ENROLL_FOREVER, str(tf_bundle), str(folder), *images],
                               stdout=subprocess.PIPE, text=True)
    for _ in range(files_written):
        assert process.stdout.readline().startswith("saving")
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    detector = Detector(tf_bundle, provider="cpu", enrollment=folder)  # verifies every file of the current version
    committed = (files_written - 1) // 16  # versions complete before the file the kill came after was started
    assert detector.enrollment is None or detector.enrollment.version >= committed
    if detector.enrollment is not None:
        assert detector.enrollment.counts()["normal_images"] == len(images) * detector.enrollment.version
    before = detector.enrollment.version if detector.enrollment is not None else None
    again = detector.line_memory.enroll(images[:1], "normal")  # a crash's leftovers do not stand in the way
    assert again.parent == before
    assert Detector(tf_bundle, provider="cpu", enrollment=folder).enrollment.version == again.version
    assert not list(folder.glob(".v*")), "leftovers of the crash are removed"


def test_live_detector_scores_while_another_thread_enrolls(detector, synth_data, target_images):
    errors, seen = [], set()

    def score():
        try:
            for _ in range(6):
                seen.update(round(r.score, 9) for r in detector.predict_batch(target_images[:2]))
        except Exception as exc:  # noqa: BLE001 - any failure fails the test
            errors.append(exc)

    threads = [threading.Thread(target=score) for _ in range(2)]
    for thread in threads:
        thread.start()
    for image in samples(synth_data, "train"):
        detector.line_memory.enroll([image], "normal", save=False)
    for thread in threads:
        thread.join()
    assert not errors
    final = [r.score for r in detector.predict_batch(target_images[:2])]
    assert len(final) == 2


def test_hnsw_search_agrees_with_exact():
    """Nearest-normal search through hnswlib: recall of the exact nearest entry at the default settings."""
    pytest.importorskip("hnswlib")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 64))
    keys = centres[rng.integers(0, 50, 6000)] + 0.4 * rng.standard_normal((6000, 64))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)
    queries = centres[rng.integers(0, 50, 500)] + 0.4 * rng.standard_normal((500, 64))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    search = Nearest(64, exact_below=1)
    search.add(keys[:3000])
    search.add(keys[3000:])  # a second batch joins the index in place
    assert search.uses_index
    similarity, rows = search.nearest(queries)
    want_similarity, want_rows = nearest_exact(queries, keys)
    recall = float(np.mean(rows == want_rows))
    assert recall >= 0.99, recall
    assert float(np.abs(similarity - want_similarity).max()) < 0.02


def test_coreset_keeps_the_cap_and_covers_outliers(tf_bundle):
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.01, (500, 8)), [[5.0] * 8]]).astype(np.float32)
    chosen = greedy_coreset(points, 10)
    assert len(chosen) == 10 and 500 in chosen, "the outlier is kept"
    np.testing.assert_array_equal(chosen, greedy_coreset(points, 10), "deterministic")

    memory = TargetMemory(EnrollmentSettings(cap=100), grid=8, image_dim=4, token_dim=6)
    from mrad.runtime.memories.enrollment import Source

    def shot(tokens, name):
        memory.add(rng.standard_normal((1, 4)), tokens[None].astype(np.float32), [Source(name, "normal")], [None])

    layout = rng.standard_normal((64, 6))
    shot(layout, "first")
    shot(layout + 0.1 * rng.standard_normal((64, 6)), "second")  # 128 entries: cut to a coreset of 100
    counts = memory.counts
    assert counts["normal/patch_1"] == counts["normal/patch_5"] == 100 and counts["normal/image"] == 2
    keys, owners = memory.level_keys("normal/patch_1")
    assert keys.shape == (100, 6) and set(owners) == {0, 1}
    shot(layout, "the first again")  # nothing new: nothing swapped in
    np.testing.assert_array_equal(memory.level_keys("normal/patch_1")[0], keys)
    shot(-layout, "unlike any")  # every patch novel: swapped in, the memory stays at the cap
    keys, owners = memory.level_keys("normal/patch_1")
    assert keys.shape == (100, 6) and (owners == 3).sum() > 20


def test_novel_swaps_replace_the_most_redundant():
    kept = np.eye(4, dtype=np.float32)[[0, 0, 1, 2]]  # rows 0 and 1 are the same entry
    radius = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
    new = np.eye(4, dtype=np.float32)[[3, 3, 0]]
    novelty = 1.0 - (new @ kept.T).max(axis=1)
    rows, chosen, radii = novel_swaps(radius, new, novelty)
    assert list(chosen) == [0] and rows[0] in (0, 1) and radii[0] == pytest.approx(1.0)  # one copy of e3, once


def test_mrad_enroll_command(tf_bundle, tmp_path, synth_data):
    folder = tmp_path / "enrollment"
    runner = CliRunner()
    base = ["--bundle", str(tf_bundle), "--enrollment", str(folder)]
    train = str(synth_data[1] / "checker" / "train" / "good")
    done = runner.invoke(enroll_cli.main, base + ["--normal", train, "--augment", "hflip"])
    assert done.exit_code == 0, done.output
    assert "version 1 (current)" in done.stdout and "2 normal images" in done.stdout  # augmented copies counted
    blob = synth_data[1] / "checker" / "test" / "blob"
    masks = synth_data[1] / "checker" / "ground_truth" / "blob"
    done = runner.invoke(enroll_cli.main, base + ["--defect", str(blob), "--masks", str(masks / "000_mask.png")])
    assert done.exit_code == 0, done.output
    assert "without a mask: image-level only" in done.stderr
    done = runner.invoke(enroll_cli.main, base + ["--map-weight", "0.25"])
    assert done.exit_code == 0 and "map weight 0.25" in done.stdout
    done = runner.invoke(enroll_cli.main, base + ["--scales", "1,3"])
    assert done.exit_code == 2 and "--clear it to change scales" in done.stderr
    listed = runner.invoke(enroll_cli.main, base + ["--list"])
    assert listed.exit_code == 0 and listed.stdout.count("version") == 3 and "version 3 (current)" in listed.stdout
    done = runner.invoke(enroll_cli.main, base + ["--defect", str(blob), "--masks", str(tmp_path)])
    assert done.exit_code == 2 and "matches no image files" in done.stderr
    (tmp_path / "odd_mask.png").write_bytes((masks / "000_mask.png").read_bytes())
    done = runner.invoke(enroll_cli.main, base + ["--defect", str(blob), "--masks", str(tmp_path / "odd_mask.png")])
    assert done.exit_code == 2 and "match no --defect image" in done.stderr
    done = runner.invoke(enroll_cli.main, base + ["--rollback", "--clear"])
    assert done.exit_code == 2 and "one of --list, --rollback, --clear" in done.stderr
    assert runner.invoke(enroll_cli.main, base + ["--rollback"]).exit_code == 0
    assert EnrollmentStore(tf_bundle, folder).head() == 2
