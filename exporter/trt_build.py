"""`posellm-edge build`: strongly typed TensorRT engines from one precision's ONNX graphs.

TensorRT 11 removed the FP16/INT8 builder flags and the implicit INT8 calibrators (deprecated since 10.1), and
Jetson runs 10.x. So precision lives in the graphs (fp16 casts, int8 Q/DQ) and every engine is built strongly
typed: `NetworkDefinitionCreationFlag.STRONGLY_TYPED` on 10.x, the only mode on 11.x. The same build is written as
`trtexec_<precision>.sh` for users who build on the device (`--commands-only` writes just that, no TensorRT needed);
`--register` then records engines that script built.

Optimization profiles (from the manifest, so engines cover what the runtime sends):
- vision: batch 1..max persons;
- decoder profile 0, prefill: the prefix call (batch = persons, a one-token masked dummy prefix, seq = prompt
  prefix incl. image tokens) and the keypoint-suffix call (batch up to max persons x keypoints on the persons'
  shared prefix); no past;
- decoder profile 1, decode: seq 1..4 (template decoding feeds at most `d , 0 .`), the shared prefix, past up to
  the max context minus the prefix.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.errors import BundleError, InputError, PoseLLMEdgeError
from runtime.manifest import EngineSpec, GraphSpec, Manifest, Variant, load_manifest, sha256_file, write_manifest
from runtime.profiles import engine_profiles

PRECISIONS = ("fp32", "fp16", "int8", "int4", "int8wo")
GRAPHS = ("vision", "decoder")
MIN_TENSORRT = 10


class BuildError(PoseLLMEdgeError, RuntimeError):
    """TensorRT is missing or too old, the parser rejected a graph, or the builder failed."""


@dataclass(frozen=True)
class BuildConfig:
    bundle: Path
    precision: str
    max_persons: int | None = None  # default: the bundle's max_persons
    workspace_gb: float | None = None  # TensorRT workspace pool limit; None: TensorRT's default (device memory)
    timing_cache: Path | None = None  # read if present, written back after the build (speeds up rebuilds)
    commands_only: bool = False  # only write trtexec_<precision>.sh (no TensorRT needed)
    register: bool = False  # record engines already built by the trtexec script instead of building

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision={self.precision!r}: expected one of {list(PRECISIONS)}")
        if self.max_persons is not None and self.max_persons < 1:
            raise InputError(f"max_persons={self.max_persons}: expected >= 1")
        if self.workspace_gb is not None and self.workspace_gb <= 0:
            raise InputError(f"workspace_gb={self.workspace_gb}: expected > 0")
        if self.commands_only and self.register:
            raise InputError("--commands-only and --register exclude each other")


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    precision: str
    script: Path
    engines: tuple[EngineSpec, ...]  # empty with commands_only
    tensorrt_version: str | None
    seconds: dict[str, float]  # per graph build time


# --------------------------------------------------------------------------------------------------- trtexec
def trtexec_command(onnx_file: str, engine_file: str, profiles: tuple[dict[str, Any], ...],
                    workspace_gb: float | None = None, timing_cache: str | None = None) -> list[str]:
    """The trtexec equivalent of `build_engine` (strongly typed; one `--profile=N` group per profile)."""
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine_file}", "--stronglyTyped", "--skipInference"]
    if workspace_gb is not None:
        cmd.append(f"--memPoolSize=workspace:{int(workspace_gb * 1024)}M")
    if timing_cache is not None:
        cmd.append(f"--timingCacheFile={timing_cache}")
    for index, profile in enumerate(profiles):
        if len(profiles) > 1:
            cmd.append(f"--profile={index}")
        for flag, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            cmd.append(flag + "=" + ",".join(f"{name}:{'x'.join(str(s) for s in shapes[k])}"
                                             for name, shapes in profile.items()))
    return cmd


def write_trtexec_script(bundle: Path, precision: str, variant: Variant, profiles: dict[str, tuple],
                         workspace_gb: float | None, timing_cache: Path | None) -> Path:
    path = bundle / f"trtexec_{precision}.sh"
    lines = [
        "#!/bin/sh",
        f"# posellm-edge: TensorRT engines of the {precision} variant, built strongly typed from its ONNX graphs",
        "# (precision is in the graphs; TensorRT 11 removed the FP16/INT8 builder flags). Run on the target",
        "# device, e.g. a Jetson with TensorRT 10.x; TRTEXEC overrides the binary (/usr/src/tensorrt/bin/trtexec).",
        "# The decoder has two optimization profiles (prefill, decode): trtexec must accept `--profile=N` before",
        "# each --minShapes/--optShapes/--maxShapes group when building; otherwise use `posellm-edge build`.",
        f"# Then record the engines in the manifest:  posellm-edge build <bundle> --precision {precision} --register",
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
    ]
    cache = str(Path(timing_cache).resolve()) if timing_cache is not None else None  # the script cd's
    for graph in GRAPHS:
        spec: GraphSpec = getattr(variant.form("tensorrt"), graph)
        cmd = trtexec_command(spec.file, engine_file(precision, graph), profiles[graph], workspace_gb, cache)
        lines.append('"$TRTEXEC" ' + " \\\n    ".join(shlex.quote(c) for c in cmd[1:]))
    text = "\n".join(lines) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def engine_file(precision: str, graph: str) -> str:
    return f"{precision}/{graph}.plan"


# ---------------------------------------------------------------------------------------------- TensorRT build
def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildError("building engines needs the TensorRT Python package (pip install 'posellm-edge[tensorrt]'"
                         "; on Jetson it ships with JetPack); without it, `--commands-only` writes the trtexec "
                         "commands") from exc
    major = int(trt.__version__.split(".")[0])
    if major < MIN_TENSORRT:
        raise BuildError(f"TensorRT {trt.__version__} is too old: strongly typed builds need >= {MIN_TENSORRT}.0")
    return trt


def network_flags(trt) -> int:
    """STRONGLY_TYPED on 10.x; on 11.x every network is strongly typed (the flag, if present, is accepted)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:
        if int(trt.__version__.split(".")[0]) < 11:
            raise BuildError(f"TensorRT {trt.__version__} has no STRONGLY_TYPED network flag")
        return 0
    return 1 << int(flag)


def _use_timing_cache(config, path: Path, log: Callable[[str], None]) -> None:
    """Load the timing cache file; TensorRT refuses one from another device or TensorRT version
    (`set_timing_cache` returns False): then start a fresh cache, which the build writes back over the old file."""
    if path.is_file() and config.set_timing_cache(config.create_timing_cache(path.read_bytes()),
                                                  ignore_mismatch=False):
        return
    if path.is_file():
        log(f"timing cache {path} was refused (another GPU or TensorRT version?); starting a fresh one")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise BuildError(f"TensorRT refused even an empty timing cache for {path}; build without --timing-cache")


def build_engine(onnx_path: Path, engine_path: Path, profiles: tuple[dict[str, Any], ...],
                 workspace_gb: float | None = None, timing_cache: Path | None = None,
                 log: Callable[[str], None] = print) -> str:
    """Parse, build strongly typed with the given profiles, serialize; returns the TensorRT version."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the graph
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors[:5]}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for shapes in profiles:
        if set(shapes) != inputs:
            raise BuildError(f"{onnx_path}: profile inputs {sorted(shapes)} != network inputs {sorted(inputs)}")
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if timing_cache is not None:
        _use_timing_cache(config, timing_cache, log)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above)")
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, engine_path)
    if timing_cache is not None:
        data = config.get_timing_cache().serialize()
        ctmp = timing_cache.with_name(timing_cache.name + ".tmp")
        with open(ctmp, "wb") as f:
            f.write(memoryview(data))
        os.replace(ctmp, timing_cache)
    return trt.__version__


def check_weight_dq(bundle: Path, variant: Variant) -> None:
    """Refuse, before any build, weight Q/DQ TensorRT would not import as weight-only quantization (e.g. int8wo's
    blocked int8)."""
    import onnx

    from .trt_ops import weight_dq_problems
    for graph in GRAPHS:
        file = getattr(variant.form("tensorrt"), graph).file
        problems = weight_dq_problems(onnx.load(str(bundle / file), load_external_data=False))
        if problems:
            raise BundleError(f"{file}: TensorRT cannot build these weight DequantizeLinear nodes: {problems[:3]}; "
                              "use the int8 or int4 variant for TensorRT")


# ------------------------------------------------------------------------------------------------- the command
def build_engines(cfg: BuildConfig, log: Callable[[str], None] = print) -> BuildResult:
    bundle = Path(cfg.bundle)
    manifest = load_manifest(bundle, verify=True)
    if cfg.precision not in manifest.variants:
        hint = (f"run `posellm-edge calibrate {bundle} --coco ANN --images DIR` first" if cfg.precision == "int8"
                else f"re-export with --precision {cfg.precision}")
        raise BundleError(f"{bundle} has no {cfg.precision} variant; {hint}")
    variant = manifest.variants[cfg.precision]
    check_weight_dq(bundle, variant)
    max_persons = cfg.max_persons or manifest.max_persons
    profiles = engine_profiles(manifest, variant, max_persons)
    script = write_trtexec_script(bundle, cfg.precision, variant, profiles, cfg.workspace_gb, cfg.timing_cache)
    log(f"wrote {script.name} (trtexec commands for the {cfg.precision} engines)")
    seconds: dict[str, float] = {}
    if cfg.commands_only:
        _publish(bundle, manifest, cfg.precision, (), script)
        return BuildResult(bundle, cfg.precision, script, (), None, seconds)
    trt = import_tensorrt()
    built: dict[str, Path] = {}
    try:
        for graph in GRAPHS:
            final = bundle / engine_file(cfg.precision, graph)
            if cfg.register:
                if not final.is_file():
                    raise InputError(f"{final}: no engine to register; run {script.name} on the device first")
                check_engine_profiles(trt, final, profiles[graph])
                built[graph] = final
                continue
            t0 = time.perf_counter()
            staged = final.with_name(final.name + ".new")
            built[graph] = staged
            source = getattr(variant.form("tensorrt"), graph).file  # weight-only: the Q/DQ form
            build_engine(bundle / source, staged, profiles[graph], cfg.workspace_gb, cfg.timing_cache, log)
            seconds[graph] = time.perf_counter() - t0
            log(f"built {final.relative_to(bundle)} (TensorRT {trt.__version__}, strongly typed, "
                f"{len(profiles[graph])} profile(s)) in {seconds[graph]:.1f}s")
    except BaseException:
        for path in built.values():
            if path.name.endswith(".new"):
                path.unlink(missing_ok=True)
        raise
    engines = tuple(EngineSpec(graph=g, file=engine_file(cfg.precision, g), tensorrt_version=trt.__version__,
                               profiles=profiles[g]) for g in GRAPHS)
    _publish(bundle, manifest, cfg.precision, engines, script, staged=built)
    return BuildResult(bundle, cfg.precision, script, engines, trt.__version__, seconds)


def _publish(bundle: Path, manifest: Manifest, precision: str, engines: tuple[EngineSpec, ...], script: Path,
             staged: dict[str, Path] | None = None) -> Manifest:
    """Consistent at each step: forget the old engines first, then move the new files in, then list them."""
    files = dict(manifest.files)
    variants = dict(manifest.variants)
    if staged:
        old_files = {e.file for e in variants[precision].engines}
        for f in old_files:
            files.pop(f, None)
        if old_files:
            variants[precision] = dataclasses.replace(variants[precision], engines=())
            write_manifest(bundle, dataclasses.replace(manifest, variants=variants, files=files))
        for graph, path in staged.items():
            final = bundle / engine_file(precision, graph)
            if path != final:
                os.replace(path, final)
            files[engine_file(precision, graph)] = sha256_file(final)
        variants[precision] = dataclasses.replace(variants[precision], engines=engines)
    files[script.name] = sha256_file(script)
    updated = dataclasses.replace(manifest, variants=variants, files=dict(sorted(files.items())))
    write_manifest(bundle, updated)
    return updated


def check_engine_profiles(trt, path: Path, profiles: tuple[dict[str, Any], ...]) -> None:
    """Deserialize an engine (so it loads with this TensorRT) and compare its profiles with the expected ones."""
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BuildError(f"{path}: this TensorRT ({trt.__version__}) cannot load the engine; rebuild it with the "
                         "same TensorRT version as the runtime")
    if engine.num_optimization_profiles != len(profiles):
        raise BuildError(f"{path}: {engine.num_optimization_profiles} optimization profile(s), expected "
                         f"{len(profiles)}; rerun the generated trtexec script")
    for index, shapes in enumerate(profiles):
        for name, expected in shapes.items():
            got = [list(d) for d in engine.get_tensor_profile_shape(name, index)]
            if got != [list(e) for e in expected]:
                raise BuildError(f"{path}: profile {index} of {name} is {got}, expected {expected}; rerun the "
                                 "generated trtexec script")
