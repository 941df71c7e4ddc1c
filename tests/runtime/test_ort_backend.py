"""onnxruntime backends without a GPU: the TensorRT EP's options (stand-in onnxruntime session) and the error when
no onnxruntime wheel is installed (it is an extra: [cpu] or [gpu])."""
from __future__ import annotations

import sys
import types

import onnxruntime
import pytest

import runtime.backends.onnxruntime as ort_backend
from runtime.backends.onnxruntime import TrtEpSettings, trt_provider_options
from runtime.errors import BundleError
from runtime.estimator import Estimator
from runtime.manifest import load_manifest, sha256_file
from runtime.profiles import engine_profiles


def _stand_in_onnxruntime(sessions: list):
    """onnxruntime with the TensorRT EP "available"; sessions record their providers and run on the CPU."""
    class InferenceSession(onnxruntime.InferenceSession):
        def __init__(self, path, opts, providers):
            sessions.append((path, providers))
            super().__init__(path, opts, providers=["CPUExecutionProvider"])

    return types.SimpleNamespace(
        get_available_providers=lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                         "CPUExecutionProvider"],
        SessionOptions=onnxruntime.SessionOptions, GraphOptimizationLevel=onnxruntime.GraphOptimizationLevel,
        InferenceSession=InferenceSession, OrtValue=onnxruntime.OrtValue)


def test_tensorrt_ep_gets_profiles_precision_and_a_user_cache(tiny_bundle, tmp_path, monkeypatch):
    sessions: list = []
    monkeypatch.setattr(ort_backend, "import_onnxruntime", lambda: _stand_in_onnxruntime(sessions))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    files_before = sorted(p.name for p in tiny_bundle.rglob("*"))
    Estimator(tiny_bundle, precision="fp16", backend="onnxruntime-trt")
    m = load_manifest(tiny_bundle)
    profiles = engine_profiles(m, m.variants["fp16"], m.max_persons)
    key = sha256_file(tiny_bundle / "manifest.json")[:16]
    assert [p.split("/")[-1] for p, _ in sessions] == ["vision.onnx", "decoder.onnx"]
    for (path, providers), graph in zip(sessions, ("vision", "decoder")):
        name, opts = providers[0]
        assert name == "TensorrtExecutionProvider"
        assert [p for p in providers[1:]] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
        # fp16 variant: fp16 kernels for both graphs (the vision graph's input is fp32), no int8
        assert opts["trt_fp16_enable"] is True and opts["trt_int8_enable"] is False
        cache = tmp_path / "cache" / "posellm-edge" / "ort-trt" / f"{key}-fp16" / graph
        assert opts["trt_engine_cache_path"] == str(cache) and cache.is_dir()
        # every profile: each input once per profile, min/opt/max as in the native engines
        for k, option in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            entries = opts[option].split(",")
            assert len(entries) == sum(len(p) for p in profiles[graph])
            want = [f"{n}:{'x'.join(map(str, dims[k]))}" for p in profiles[graph] for n, dims in p.items()]
            assert entries == want
        print(graph, {k: (v[:60] + "...") if isinstance(v, str) and len(v) > 60 else v for k, v in opts.items()})
    assert opts["trt_profile_min_shapes"].count("inputs_embeds:") == 2  # decoder: prefill + decode profiles
    assert sorted(p.name for p in tiny_bundle.rglob("*")) == files_before  # nothing written into the bundle


@pytest.mark.parametrize("precision,fp16,int8", [("fp32", False, False), ("fp16", True, False),
                                                 ("int8", True, True)])
def test_tensorrt_ep_precision_flags_follow_the_variant(tmp_path, precision, fp16, int8):
    profile = ({"x": [[1, 3], [2, 3], [4, 3]]},)
    opts = trt_provider_options(TrtEpSettings(profile, precision, tmp_path))
    assert (opts["trt_fp16_enable"], opts["trt_int8_enable"]) == (fp16, int8)
    assert (opts["trt_profile_min_shapes"], opts["trt_profile_max_shapes"]) == ("x:1x3", "x:4x3")


def test_missing_onnxruntime_is_one_clear_error(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    with pytest.raises(BundleError, match=r"pip install 'posellm-edge\[cpu\]'.*'posellm-edge\[gpu\]'.*Jetson"):
        Estimator(tiny_bundle)
