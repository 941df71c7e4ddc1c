"""TensorRT build: optimization profiles against the shapes the runtime really sends, the generated trtexec commands
(no TensorRT needed), the runner's version refusal, and — where TensorRT and a GPU exist — build-and-run parity."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import tiny
from exporter import trt_cli
from exporter.trt_build import BuildConfig, BuildError, build_engines, engine_profiles, trtexec_command
from runtime.backends import open_runner
from runtime.backends.base import GraphRunner
from runtime.errors import BundleError, InputError
from runtime.estimator import Estimator
from runtime.manifest import EngineSpec, load_manifest

BOXES = [[10.0, 20.0, 100.0, 150.0], [120.0, 30.0, 90.0, 200.0]]


def _tensorrt_gpu() -> str | None:
    """None when TensorRT, cuda-python and a GPU are usable; else why not (the skip reason)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed (pip install 'posellm-edge[tensorrt]')"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return "cuda-python is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA GPU visible"
    return None


NO_TRT = _tensorrt_gpu()
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=f"TensorRT build/run tests skipped: {NO_TRT}")


@pytest.fixture
def bundle(tmp_path, tiny_bundle) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


class _ShapeRecorder(GraphRunner):
    def __init__(self, inner: GraphRunner) -> None:
        self.inner, self.spec, self.check, self.shapes = inner, inner.spec, False, []

    def run(self, inputs, keep_on_device=()):
        self.shapes.append({k: tuple(np.shape(v)) for k, v in inputs.items()})
        return self.inner(inputs, keep_on_device)


def _fits(shapes: dict, profile: dict) -> bool:
    return all(all(lo <= s <= hi for lo, s, hi in zip(mn, shapes[n], mx)) for n, (mn, _, mx) in profile.items())


def test_profiles_cover_every_shape_the_runtime_sends(tiny_bundle):
    m = load_manifest(tiny_bundle)
    profiles = engine_profiles(m, m.variants["fp16"], m.max_persons)
    prefix = len(m.prompts.prefix_ids) + m.prompts.num_image_tokens
    longest = max(len(k.suffix_ids) for k in m.prompts.keypoints)
    rows = m.max_persons * 17
    vision, = profiles["vision"]
    assert vision["pixel_values"][0][0] == 1 and vision["pixel_values"][2][0] == m.max_persons
    prefill, decode = profiles["decoder"]
    assert prefill["inputs_embeds"][2][:2] == [rows, max(prefix, longest + 13)]
    assert [prefill["prefix_key_values.0.key"][k][2] for k in range(3)] == [1, prefix, prefix]  # never empty
    assert [prefill["past_key_values.0.key"][k][2] for k in range(3)] == [0, 0, 0]
    assert prefill["prefix_key_values.0.key"][2][0] == m.max_persons
    assert decode["inputs_embeds"][0][1] == 1 and decode["inputs_embeds"][2][:2] == [rows, 4]
    assert [decode["prefix_key_values.1.value"][k][2] for k in range(3)] == [prefix, prefix, prefix]
    assert decode["past_key_values.1.value"][2][2] == m.max_context - prefix
    for decoding in ("template", "free"):  # every decoder/vision call of a 3-person image fits a profile
        est = Estimator(tiny_bundle, precision="fp16", decoding=decoding, threads=2)
        est.vision = _ShapeRecorder(est.vision)
        est.decoder.runner = rec = _ShapeRecorder(est.decoder.runner)
        est.estimate(tiny.random_image(1), BOXES + [[50.0, 60.0, 80.0, 120.0]])
        assert all(_fits(s, vision) for s in est.vision.shapes)
        unfit = [s["inputs_embeds"] for s in rec.shapes if not any(_fits(s, p) for p in (prefill, decode))]
        assert not unfit, f"{decoding}: decoder calls outside both profiles: {unfit}"
        print(f"{decoding}: {len(rec.shapes)} decoder calls, all inside the prefill/decode profiles")


def test_trtexec_command_format():
    profiles = ({"x": [[1, 3], [2, 3], [4, 3]], "y.0": [[1, 0], [1, 5], [4, 5]]},
                {"x": [[1, 1], [1, 1], [4, 1]], "y.0": [[1, 1], [1, 9], [4, 9]]})
    cmd = trtexec_command("fp16/decoder.onnx", "fp16/decoder.plan", profiles, workspace_gb=1.5,
                          timing_cache="/t/cache")
    assert cmd == ["trtexec", "--onnx=fp16/decoder.onnx", "--saveEngine=fp16/decoder.plan", "--stronglyTyped",
                   "--skipInference", "--memPoolSize=workspace:1536M", "--timingCacheFile=/t/cache",
                   "--profile=0", "--minShapes=x:1x3,y.0:1x0", "--optShapes=x:2x3,y.0:1x5",
                   "--maxShapes=x:4x3,y.0:4x5",
                   "--profile=1", "--minShapes=x:1x1,y.0:1x1", "--optShapes=x:1x1,y.0:1x9",
                   "--maxShapes=x:4x1,y.0:4x9"]
    single = trtexec_command("a.onnx", "a.plan", profiles[:1])
    assert "--profile=0" not in single and not any(c.startswith("--memPoolSize") for c in single)


def test_commands_only_writes_trtexec_script_without_tensorrt(bundle, tmp_path):
    parser = argparse.ArgumentParser()
    trt_cli.add_arguments(parser)
    args = parser.parse_args([str(bundle), "--precision", "fp16", "--commands-only", "--workspace", "2",
                              "--timing-cache", str(tmp_path / "timing.cache"), "--max-persons", "2"])
    assert trt_cli.run(args) == 0
    script = bundle / "trtexec_fp16.sh"
    text = script.read_text()
    print(text)
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    assert text.count("--stronglyTyped") == 2 and not re.search(r"--(fp16|int8|bf16|best)\b", text)
    assert "--onnx=fp16/vision.onnx" in text and "--saveEngine=fp16/decoder.plan" in text
    assert "--profile=0" in text and "--profile=1" in text  # decoder: prefill + decode profiles
    assert "--maxShapes=pixel_values:2x3x224x224" in text and "inputs_embeds:34x258x64" in text
    assert f"--timingCacheFile={tmp_path / 'timing.cache'}" in text and "workspace:2048M" in text
    m = load_manifest(bundle, verify=True)  # the script is listed with its sha256
    assert "trtexec_fp16.sh" in m.files and m.variants["fp16"].engines == ()
    with pytest.raises(BundleError, match="calibrate"):
        build_engines(BuildConfig(bundle, "int8", commands_only=True))
    with pytest.raises(InputError, match="exported range"):
        build_engines(BuildConfig(bundle, "fp16", commands_only=True, max_persons=m.max_persons + 1))


@pytest.mark.skipif(NO_TRT is None, reason="TensorRT is installed: the missing-TensorRT message is not reachable")
def test_build_without_tensorrt_points_to_commands_only(bundle):
    with pytest.raises(BuildError, match="--commands-only"):
        build_engines(BuildConfig(bundle, "fp16"))
    assert (bundle / "trtexec_fp16.sh").is_file()  # the commands are still written


def test_trt_runner_refuses_engine_of_another_tensorrt_version(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.99.0"))
    m = load_manifest(tiny_bundle)
    v = m.variants["fp16"]
    engine = EngineSpec(graph="vision", file="fp16/vision.plan", tensorrt_version="10.3.0", profiles=())
    with pytest.raises(BundleError, match=r"10\.3\.0.*10\.99\.0.*posellm-edge build <bundle> --precision fp16"):
        open_runner("tensorrt", tiny_bundle, v.vision, engine)
    with pytest.raises(InputError, match="posellm-edge build"):
        open_runner("tensorrt", tiny_bundle, v.vision, None)


# ------------------------------------------------------------------------------- TensorRT + GPU (skipped here)
@needs_trt
def test_build_register_and_run_fp16_engines(bundle, tmp_path):
    result = build_engines(BuildConfig(bundle, "fp16", workspace_gb=2, timing_cache=tmp_path / "cache"))
    print(f"TensorRT {result.tensorrt_version}: build seconds {result.seconds}")
    m = load_manifest(bundle, verify=True)
    engines = {e.graph: e for e in m.variants["fp16"].engines}
    assert set(engines) == {"vision", "decoder"} and len(engines["decoder"].profiles) == 2
    assert (tmp_path / "cache").is_file()
    image = tiny.random_image(0)
    trt = Estimator(bundle, precision="fp16", backend="tensorrt")
    ort = Estimator(bundle, precision="fp16", threads=2)
    px = np.stack([np.zeros((3, 224, 224), np.float32), np.ones((3, 224, 224), np.float32)])
    a = trt.vision.to_numpy(trt.vision({"pixel_values": px})["image_embeds"]).astype(np.float32)
    b = ort.vision({"pixel_values": px})["image_embeds"].astype(np.float32)
    print(f"image_embeds TensorRT fp16 vs onnxruntime fp16: max|diff| {np.abs(a - b).max():.3e}")
    assert np.abs(a - b).max() <= 2e-2 * max(1.0, np.abs(b).max())
    for decoding in ("template", "free"):
        got = Estimator(bundle, precision="fp16", backend="tensorrt", decoding=decoding).estimate(image, BOXES)
        ref = Estimator(bundle, precision="fp16", decoding=decoding, threads=2).estimate(image, BOXES)
        diff = max(np.abs(g.keypoints[:, :2] - r.keypoints[:, :2]).max() for g, r in zip(got, ref))
        print(f"{decoding}: keypoints TensorRT vs onnxruntime max|diff| {diff:.3f} px")
        assert len(got) == 2 and all(np.all(np.isfinite(g.keypoints)) for g in got)
    again = build_engines(BuildConfig(bundle, "fp16", register=True))  # as after running trtexec_fp16.sh
    assert again.engines == m.variants["fp16"].engines and load_manifest(bundle, verify=True)


@needs_trt
def test_build_int8_engines_from_qdq_graphs(bundle):
    from calibration import CalibrationConfig, calibrate_bundle
    coco = tiny.SHARED / "data" / "coco-mini"
    calibrate_bundle(CalibrationConfig(bundle, coco / "person_keypoints.json", coco / "images", method="minmax",
                                       samples=4, eval_persons=1))
    result = build_engines(BuildConfig(bundle, "int8", workspace_gb=2))
    print(f"int8 engines built in {result.seconds}")
    got = Estimator(bundle, precision="int8", backend="tensorrt").estimate(tiny.random_image(0), BOXES)
    assert len(got) == 2 and all(np.all(np.isfinite(g.keypoints)) for g in got)


# ------------------------------------------------- TrtRunner logic against a stand-in TensorRT (no GPU needed)
class _FakeCudart:
    """Host memory standing in for device memory (ctypes), with the cuda-python call conventions; counts calls."""

    class cudaError_t:  # noqa: N801
        cudaSuccess = "cudaSuccess"

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    def __init__(self):
        import collections
        import ctypes
        self.ctypes, self.buffers, self.copies = ctypes, {}, 0
        self.calls = collections.Counter()

    def _alloc(self, n, kind):
        self.calls[kind] += 1
        buf = self.ctypes.create_string_buffer(n)
        self.buffers[self.ctypes.addressof(buf)] = buf
        return self.cudaError_t.cudaSuccess, self.ctypes.addressof(buf)

    def cudaMalloc(self, n):  # noqa: N802
        return self._alloc(n, "cudaMalloc")

    def cudaMallocHost(self, n):  # noqa: N802
        return self._alloc(n, "cudaMallocHost")

    def cudaMallocAsync(self, n, stream):  # noqa: N802
        return self._alloc(n, "cudaMallocAsync")

    def _free(self, ptr, kind="cudaFree", stream=None):
        self.calls[kind] += 1
        self.buffers.pop(ptr, None)
        return (self.cudaError_t.cudaSuccess,)

    def cudaFree(self, ptr):  # noqa: N802
        return self._free(ptr)

    def cudaFreeHost(self, ptr):  # noqa: N802
        return self._free(ptr, "cudaFreeHost")

    def cudaFreeAsync(self, ptr, stream):  # noqa: N802
        return self._free(ptr, "cudaFreeAsync")

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):  # noqa: N802
        self.ctypes.memmove(dst, src, n)
        self.copies += 1
        return (self.cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self):  # noqa: N802
        return self.cudaError_t.cudaSuccess, 7

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls["cudaStreamSynchronize"] += 1
        return (self.cudaError_t.cudaSuccess,)

    def cudaSetDevice(self, device):  # noqa: N802
        return (self.cudaError_t.cudaSuccess,)

    cudaStreamDestroy = cudaSetDevice


def _fake_tensorrt(version: str, onnx_path: Path, profiles: tuple):
    """A stand-in `tensorrt` whose engine runs the ONNX graph with onnxruntime on the fake device memory."""
    import ctypes

    import onnxruntime as ort
    session = ort.InferenceSession(str(onnx_path))
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    onnx_types = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
                  "tensor(int32)": "int32"}
    dtypes = {i.name: np.dtype(onnx_types[i.type]) for i in session.get_inputs() + session.get_outputs()}
    shape_cache = {}

    class Context:
        refuse_profile = False  # set to make set_optimization_profile_async fail
        refuse_address = False  # set to make set_tensor_address fail

        def __init__(self):
            self.shapes, self.addr, self.profile = {}, {}, 0

        def set_optimization_profile_async(self, index, stream):
            self.profile = index
            return not self.refuse_profile

        def set_input_shape(self, name, shape):
            lo, _, hi = profiles[self.profile][name]
            self.shapes[name] = tuple(shape)
            return all(a <= s <= b for a, s, b in zip(lo, shape, hi))

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr
            return not self.refuse_address

        def _read(self, name):
            n = int(np.prod(self.shapes[name])) * dtypes[name].itemsize
            return np.frombuffer(ctypes.string_at(self.addr[name], n), dtypes[name]).reshape(self.shapes[name])

        def get_tensor_shape(self, name):  # shape inference: the graph run on zeros of the set input shapes
            key = tuple(sorted(self.shapes.items()))
            if key not in shape_cache:
                zeros = {k: np.zeros(self.shapes[k], dtypes[k]) for k in names_in}
                shape_cache[key] = dict(zip(names_out, (o.shape for o in session.run(None, zeros))))
            return shape_cache[key][name]

        def execute_async_v3(self, stream):
            out = dict(zip(names_out, session.run(None, {k: self._read(k) for k in names_in})))
            for name in names_out:
                a = np.ascontiguousarray(out[name])
                ctypes.memmove(self.addr[name], a.ctypes.data, a.nbytes)
            return True

    class Engine:
        num_io_tensors = len(names_in) + len(names_out)
        num_optimization_profiles = len(profiles)
        contexts = []

        def get_tensor_name(self, i):
            return (names_in + names_out)[i]

        def get_tensor_mode(self, name):
            return "INPUT" if name in names_in else "OUTPUT"

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def get_tensor_profile_shape(self, name, index):
            return profiles[index][name]

        def create_execution_context(self, strategy=None):
            self.contexts.append(Context())
            return self.contexts[-1]

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    engine = Engine()
    return types.SimpleNamespace(
        __version__=version, Logger=Logger, TensorIOMode=types.SimpleNamespace(INPUT="INPUT"),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(ON_PROFILE_CHANGE="ON_PROFILE_CHANGE"),
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: engine),
        nptype=np.dtype, engine=engine)


def test_trt_runner_logic_with_stand_in_tensorrt(bundle, monkeypatch):
    """Profile choice per call (prefill vs decode context), device-resident KV cache (shared prefix included),
    int64 inputs: the Estimator on TrtRunner matches onnxruntime exactly (same graphs behind the stand-in)."""
    import runtime.backends.tensorrt as trt_backend
    m = load_manifest(bundle)
    v = m.variants["fp16"]
    profiles = engine_profiles(m, v, m.max_persons)
    fakes = {g: _fake_tensorrt("10.3.0", bundle / getattr(v, g).file, profiles[g]) for g in ("vision", "decoder")}
    cudart = _FakeCudart()
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: cudart)
    runners = {}
    for g in ("vision", "decoder"):
        (bundle / f"fp16/{g}.plan").write_bytes(b"stand-in")
        monkeypatch.setitem(sys.modules, "tensorrt", fakes[g])
        spec = EngineSpec(graph=g, file=f"fp16/{g}.plan", tensorrt_version="10.3.0", profiles=profiles[g])
        runners[g] = open_runner("tensorrt", bundle, getattr(v, g), spec)
    est = Estimator(bundle, precision="fp16", threads=2)
    ref = est.estimate(tiny.random_image(2), BOXES)
    est.vision, est.decoder.runner = runners["vision"], runners["decoder"]
    got = est.estimate(tiny.random_image(2), BOXES)
    for g, r in zip(got, ref):
        assert np.array_equal(g.keypoints, r.keypoints)
    assert len(fakes["decoder"].engine.contexts) == 2  # one context per profile: prefill and decode
    assert {c.profile for c in fakes["decoder"].engine.contexts} == {0, 1}
    with pytest.raises(InputError, match="fit none of the engine's optimization profiles"):
        runners["vision"].profile_for({"pixel_values": (m.max_persons + 1, 3, 224, 224)})


# ------------------------------------------------- timing cache refusal (stand-in builder config, no GPU needed)
class _FakeBuilderConfig:
    """`IBuilderConfig`'s timing-cache calls: `set_timing_cache` returns False for a cache it refuses."""

    def __init__(self, refuse: set[bytes]):
        self.refuse, self.set_calls = refuse, []

    def create_timing_cache(self, data: bytes):
        return types.SimpleNamespace(data=bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.set_calls.append(cache.data)
        return cache.data not in self.refuse


def test_refused_timing_cache_starts_a_fresh_one(tmp_path):
    from exporter.trt_build import _use_timing_cache
    path = tmp_path / "timing.cache"
    path.write_bytes(b"cache from another GPU")
    lines = []
    config = _FakeBuilderConfig(refuse={b"cache from another GPU"})
    _use_timing_cache(config, path, lines.append)
    assert config.set_calls == [b"cache from another GPU", b""]  # refused, then a fresh one
    assert "was refused" in lines[0] and str(path) in lines[0]
    config = _FakeBuilderConfig(refuse=set())  # an accepted cache is used as is, silently
    _use_timing_cache(config, path, lines.append)
    assert config.set_calls == [b"cache from another GPU"] and len(lines) == 1
    with pytest.raises(BuildError, match="refused even an empty timing cache"):
        _use_timing_cache(_FakeBuilderConfig(refuse={b"", b"cache from another GPU"}), path, lines.append)


def _stand_in_runners(bundle: Path, monkeypatch, max_persons: int):
    """TrtRunners over stand-in engines whose profiles were built for `max_persons` (`build --max-persons`)."""
    import runtime.backends.tensorrt as trt_backend
    m = load_manifest(bundle)
    v = m.variants["fp16"]
    profiles = engine_profiles(m, v, max_persons)
    cudart = _FakeCudart()
    monkeypatch.setattr(trt_backend, "_import_cudart", lambda: cudart)
    runners, fakes = {}, {}
    for g in ("vision", "decoder"):
        fakes[g] = _fake_tensorrt("10.3.0", bundle / getattr(v, g).file, profiles[g])
        (bundle / f"fp16/{g}.plan").write_bytes(b"stand-in")
        monkeypatch.setitem(sys.modules, "tensorrt", fakes[g])
        spec = EngineSpec(graph=g, file=f"fp16/{g}.plan", tensorrt_version="10.3.0", profiles=profiles[g])
        runners[g] = open_runner("tensorrt", bundle, getattr(v, g), spec)
    return runners, fakes, cudart


def test_engine_profile_caps_and_no_allocation_in_the_decode_loop(bundle, monkeypatch):
    """Engines built for 1 person (bundle: 3): the Estimator batches 1 person per call instead of failing with
    "fit none of the engine's optimization profiles". After the first call of each kind nothing is allocated:
    no cudaMalloc/cudaMallocHost, one stream synchronisation per call; the KV cache alone comes from the
    stream-ordered pool (cudaMallocAsync, no device synchronisation)."""
    import runtime.estimator as estimator_mod
    runners, fakes, cudart = _stand_in_runners(bundle, monkeypatch, max_persons=1)
    m = load_manifest(bundle)
    assert m.max_persons == 3
    ref = Estimator(bundle, precision="fp16", threads=2).estimate(tiny.random_image(2), BOXES)
    monkeypatch.setattr(estimator_mod, "open_runner", lambda backend, bundle, spec, *a, **k:
                        runners["vision" if spec.file.endswith("vision.onnx") else "decoder"])
    est = Estimator(bundle, precision="fp16", backend="tensorrt")
    assert est.max_persons == 1 and est.max_batch == 17
    with pytest.raises(InputError, match=r"max_batch=34 exceeds the decoder engine's profiles \(at most 17"):
        Estimator(bundle, precision="fp16", backend="tensorrt", max_batch=34)
    calls = []  # (graph, profile, counter delta) per runner call
    for g, r in runners.items():
        def traced(inputs, keep_on_device=(), _run=r.run, _g=g, _r=r):
            before = cudart.calls.copy()
            out = _run(inputs, keep_on_device)
            profile = _r.profile_for({n: tuple(np.shape(inputs[n])) for n in _r.inputs})
            calls.append((_g, profile, cudart.calls - before))
            return out
        monkeypatch.setattr(r, "run", traced)
    seen = set()
    for decoding in ("template", "free"):
        est = Estimator(bundle, precision="fp16", backend="tensorrt", decoding=decoding)
        first = len(calls)
        got = est.estimate(tiny.random_image(2), BOXES)
        if decoding == "template":  # 1 person per batch here, 2 in `ref`: same answers, scores within 1e-6
            diff = max(float(np.abs(g.keypoints[:, 2] - r.keypoints[:, 2]).max()) for g, r in zip(got, ref))
            print(f"vs onnxruntime (2 persons per batch): max score diff {diff:.1e} (tol 1e-6)")
            assert all(np.array_equal(g.keypoints[:, :2], r.keypoints[:, :2]) for g, r in zip(got, ref))
            assert diff <= 1e-6
        run = calls[first:]
        assert sum(c[0] == "vision" for c in run) == len(BOXES)  # one person per call: the engine's cap
        decode = [c for c in run if c[0] == "decoder" and c[1] == 1]
        n_kv = 2 * m.dims.num_layers
        print(f"{decoding}: {len(run)} calls, {len(decode)} decode steps; counts per decode step "
              f"{[dict(c[2]) for c in decode[1:3]]}")
        assert len(decode) >= 4 * len(BOXES)  # each person is its own batch: several decode steps each
        for i, (g, profile, delta) in enumerate(run):
            new_context = g == "decoder" and (g, profile) not in seen  # set_optimization_profile_async: one more
            seen.add((g, profile))
            assert delta["cudaStreamSynchronize"] == 1 + new_context, (g, profile, dict(delta))
            assert delta["cudaMallocAsync"] == (n_kv if g == "decoder" else 0)
        steady = decode[1:] if decoding == "template" else decode  # free runs after template: already warm
        assert all(delta["cudaMalloc"] == delta["cudaMallocHost"] == delta["cudaFree"] == 0
                   for _, _, delta in steady), [dict(d) for _, _, d in steady]


def test_trt_runner_checks_profile_and_address_results(bundle, monkeypatch):
    runners, fakes, _ = _stand_in_runners(bundle, monkeypatch, max_persons=3)
    est = Estimator(bundle, precision="fp16")
    est.vision, est.decoder.runner = runners["vision"], runners["decoder"]
    fakes["decoder"].engine.contexts.clear()
    type(fakes["decoder"].engine.create_execution_context()).refuse_profile = True
    with pytest.raises(RuntimeError, match=r"decoder.onnx: TensorRT refused optimization profile 0 of 2"):
        est.estimate(tiny.random_image(2), BOXES[:1])
    runners, fakes, _ = _stand_in_runners(bundle, monkeypatch, max_persons=3)
    type(fakes["vision"].engine.create_execution_context()).refuse_address = True
    with pytest.raises(RuntimeError, match=r"vision.onnx: TensorRT refused the device address of tensor "
                                           r"(pixel_values|image_embeds)"):
        runners["vision"]({"pixel_values": np.zeros((1, 3, 224, 224), np.float32)})
