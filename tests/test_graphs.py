"""The graph runner takes ONNX Runtime's own provider and session forms as well as the short names."""

import numpy as np
import onnxruntime as ort
import pytest

from mrad.runtime import Detector, ProviderError

SCORE_TOLERANCE = 1e-6  # the same graph on the same provider, other session settings


def test_providers_in_onnxruntimes_own_forms(tf_bundle, target_images):
    want = Detector(tf_bundle, provider="cpu").predict(target_images[0]).score
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    for providers in (["CPUExecutionProvider"], [("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]):
        detector = Detector(tf_bundle, provider=providers, session_options=options)
        assert detector.providers == ["CPUExecutionProvider"]
        assert detector.encoder.session.get_session_options().intra_op_num_threads == 1
        assert detector.predict(target_images[0]).score == pytest.approx(want, abs=SCORE_TOLERANCE)


def test_unavailable_providers_are_named(tf_bundle):
    with pytest.raises(ProviderError, match="NoSuchExecutionProvider"):
        Detector(tf_bundle, provider=["NoSuchExecutionProvider"])
    with pytest.raises(ProviderError, match="unknown provider 'gpu'"):
        Detector(tf_bundle, provider="gpu")


# OpenVINO's f32 kernels order sums differently from ONNX Runtime's: fp32 rounding only.
OPENVINO_F32_TOLERANCE = 1e-4
# bfloat16 keeps 8 bits of mantissa: relative steps of 2**-8 at every product; the score is a mean of
# softmax-weighted labels, which that moves by a few hundredths at most on the tiny model.
OPENVINO_BF16_SCORE_TOLERANCE = 0.05


@pytest.mark.parametrize("provider", ["openvino", "openvino-bf16"])
def test_openvino_scores_as_onnxruntime(provider, tf_bundle, target_images):
    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'mrad-edge[openvino]')")
    reference, compiled = Detector(tf_bundle, provider="cpu"), Detector(tf_bundle, provider=provider)
    assert compiled.providers[0] in ("OpenVINO CPU (f32)", "OpenVINO CPU (bf16)")
    want, got = reference.predict_batch(target_images[:4]), compiled.predict_batch(target_images[:4])
    for a, b in zip(want, got):
        if provider == "openvino":
            assert b.score == pytest.approx(a.score, abs=OPENVINO_F32_TOLERANCE)
            np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, atol=OPENVINO_F32_TOLERANCE)
        else:
            assert b.score == pytest.approx(a.score, abs=OPENVINO_BF16_SCORE_TOLERANCE)


def test_openvino_runs_from_several_threads(tf_bundle, target_images):
    """Each thread has its own inference request: results do not overwrite each other."""
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install 'mrad-edge[openvino]')")
    detector = Detector(tf_bundle, provider="openvino")
    want = [detector.predict(p).score for p in target_images[:6]]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda p: detector.predict(p).score, target_images[:6]))
    assert got == pytest.approx(want, abs=1e-6)
