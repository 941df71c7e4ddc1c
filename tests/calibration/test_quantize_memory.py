"""Issue #24's memory changes keep the numbers: the Hessian handed over to GPTQ, the in-place output error and the
FormWriter's bytes-free external references give bit for bit what the plain forms gave."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, numpy_helper

from calibration.blockwise import quantize_gptq, quantize_rtn
from calibration.form_writer import FormWriter
from calibration.gptq_statistics import output_error


def _problem(k: int = 96, n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, k)) @ rng.standard_normal((k, k)) * 0.1
    x[:, 5] = 0  # a never-seen input (zero diagonal)
    return rng.standard_normal((k, n)).astype(np.float32), x.T @ x


def test_handed_over_hessian_is_freed_and_gives_the_same_ints():
    w, h = _problem()
    kept = quantize_gptq(w, h, 4, 32)
    box = [h.copy()]
    handed = quantize_gptq(w, box, 4, 32)
    assert box == []  # the caller's only reference went with the list
    assert np.array_equal(kept.q, handed.q) and np.array_equal(kept.scales, handed.scales)


def test_in_place_output_error_is_the_textbook_expression_bit_for_bit():
    w, h = _problem(seed=1)
    for bq in (quantize_rtn(w, 4, 32), quantize_gptq(w, h, 4, 32)):
        d = w.astype(np.float64) - bq.dequantize(np.float64)  # the expression quantize used before #24's change
        old = float(np.sqrt(float(np.sum(d * (h @ d))) / float(np.sum(w * (h @ w.astype(np.float64))))))
        assert output_error(w, bq, h) == old


def test_streamed_tensor_keeps_no_bytes(tmp_path):
    """_stream hands back a new proto: the one holding the bytes (and its protobuf arena) can be freed."""
    writer = FormWriter.__new__(FormWriter)
    writer.data_name = "x.onnx.data"
    writer._data = open(tmp_path / writer.data_name, "wb")
    t = numpy_helper.from_array(np.arange(1 << 12, dtype=np.float32).reshape(64, 64), "w")
    ref = writer._stream(t)
    writer._data.close()
    assert ref is not t and not ref.HasField("raw_data") and ref.data_location == TensorProto.EXTERNAL
    assert list(ref.dims) == [64, 64] and ref.data_type == TensorProto.FLOAT and ref.name == "w"
    assert (tmp_path / writer.data_name).read_bytes() == t.raw_data
