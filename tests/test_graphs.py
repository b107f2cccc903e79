"""The graph runner takes ONNX Runtime's own provider and session forms as well as the short names."""

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
