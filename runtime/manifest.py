"""The bundle contract: `manifest.json`, one versioned schema that the exporter writes and the runtime reads.

Everything the runtime needs is here, so it never re-derives settings from a checkpoint. Loading checks the schema
version and the sha256 of every listed file before any inference, and names the bad file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError
from .onnx_external import external_data_locations
from .paths import inside

# 2: the decoder takes the shared prefix K/V as its own inputs (prefix_key_values.*)
# 3: its attention_mask covers prefix + past + new tokens; the prefix prefill passes a masked one-token dummy
#    prefix; a variant may carry a second graph form for TensorRT (`tensorrt`)
SCHEMA_VERSION = 3
SUPPORTED_SCHEMA_VERSIONS = (3,)
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic dimension


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dynamic_ranges: dict[str, tuple[int, int]]  # dim name → (min, max) the graph was validated/built for
    external_data: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineSpec:
    graph: str  # "vision" | "decoder"
    file: str
    tensorrt_version: str
    profiles: tuple[dict[str, Any], ...]  # per profile: input name → [min, opt, max] shapes


@dataclass(frozen=True)
class GraphForm:
    """The same weights written as other graphs, for backends that need another form."""

    vision: GraphSpec
    decoder: GraphSpec
    embedding: str


TENSORRT_BACKENDS = ("tensorrt", "onnxruntime-trt")


@dataclass(frozen=True)
class ExportStats:
    """How this variant was exported: its bytes on disk and the export process's peak resident memory while it was
    written (and validated), so a user can size the machine before exporting a bigger checkpoint."""

    bytes: int  # graphs + external data + embedding table
    peak_rss_bytes: int  # the export process's peak RSS from its start to the end of this variant (validation incl.)
    export_seconds: float
    validation_seconds: float | None  # None: exported with --skip-validate


@dataclass(frozen=True)
class Variant:
    precision: str  # fp32 | fp16 | int8 | int4 | int8wo (weight-only)
    vision: GraphSpec
    decoder: GraphSpec
    embedding: str  # .npy file of the LLM token embedding table, memory-mapped by the runtime
    calibration: dict[str, Any] | None = None  # int8 only: artifact file, method, samples, data hash, sha256
    engines: tuple[EngineSpec, ...] = ()
    # int4/int8wo: the decoder above is onnxruntime's MatMulNBits form; TensorRT gets the ONNX-standard blocked
    # DequantizeLinear form of the same quantized weights (with fp16 activations) from here
    tensorrt: GraphForm | None = None
    export: ExportStats | None = None  # absent in post-hoc variants (int8, int4, int8wo)

    def form(self, backend: str) -> GraphForm:
        """The graphs a backend runs: the TensorRT form where there is one, else the variant's own graphs."""
        if backend in TENSORRT_BACKENDS and self.tensorrt is not None:
            return self.tensorrt
        return GraphForm(self.vision, self.decoder, self.embedding)


@dataclass(frozen=True)
class KeypointPrompt:
    name: str
    description: str
    suffix_ids: tuple[int, ...]


@dataclass(frozen=True)
class Prompts:
    prefix_ids: tuple[int, ...]  # `<s> ▁Image :` (LocLLM: whitespace next to <im_patch> stripped)
    image_token_id: int
    num_image_tokens: int
    keypoints: tuple[KeypointPrompt, ...]
    bos_id: int
    eos_id: int
    pad_id: int
    answer_template_ids: tuple[int, ...] | None  # the 13 ids of `[0.000,0.000]`; None → template mode unavailable
    digit_ids: tuple[int, ...] | None  # ids of '0'..'9'
    digit_positions: tuple[int, ...]
    max_new_tokens: int = 13


@dataclass(frozen=True)
class Dims:
    vision_embed: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_patches: int
    logits_positions: int  # K: the decoder returns logits for the last K positions only


@dataclass(frozen=True)
class Preprocess:
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pixel_std: float = 200.0
    aspect_ratio: float = 1.0


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    toolkit_version: str
    source_checkpoint_sha256: str
    library_versions: dict[str, str]
    dims: Dims
    preprocess: Preprocess
    prompts: Prompts
    tokenizer: str
    max_persons: int
    max_context: int
    variants: dict[str, Variant]
    files: dict[str, str] = field(default_factory=dict)  # relative path → sha256

    def variant(self, precision: str) -> Variant:
        if precision not in self.variants:
            raise BundleError(f"precision {precision!r} is not in this bundle; it has {sorted(self.variants)}")
        return self.variants[precision]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"manifest is not valid JSON: {exc}") from None
        except RecursionError:  # the stdlib parser recurses once per nesting level
            raise BundleError("manifest nests arrays/objects too deeply to parse") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise BundleError(f"manifest schema_version {version!r} is not supported; this runtime reads "
                              f"versions {list(SUPPORTED_SCHEMA_VERSIONS)} — upgrade posellm-edge or re-export")
        return _build(cls, data, "manifest")


def _build(tp: Any, value: Any, where: str) -> Any:
    """Strict, typed construction of nested frozen dataclasses from JSON (unknown keys are errors)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise BundleError(f"{where}: expected an object")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise BundleError(f"{where}: unknown keys {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(tp) if f.name not in value
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        if missing:
            raise BundleError(f"{where}: missing keys {missing}")
        return tp(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in value.items()})
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _build(arg, value, where)
            except (BundleError, TypeError, ValueError):
                continue
        raise BundleError(f"{where}: {value!r} matches none of {args}")
    if origin is tuple:
        if not isinstance(value, list):
            raise BundleError(f"{where}: expected a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise BundleError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise BundleError(f"{where}: expected an object")
        return {k: _build(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise BundleError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read and validate a bundle's manifest; with `verify`, check every file's sha256 first."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: no manifest.json — is {bundle} a posellm-edge bundle?")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); is it a manifest?") from None
    try:
        manifest = Manifest.from_json(text)
    except BundleError as exc:
        raise BundleError(f"{path}: {exc}") from None
    check_paths(bundle, manifest)  # before any listed file is opened
    if verify:
        verify_files(bundle, manifest)
    check_external_data(bundle, manifest)  # after hashing, so a corrupt graph is reported as such
    return manifest


def named_paths(manifest: Manifest) -> list[tuple[str, str]]:
    """(where, relative path) of every file the manifest names."""
    named = [("tokenizer", manifest.tokenizer)] + [(f"files[{rel!r}]", rel) for rel in manifest.files]
    for precision, v in manifest.variants.items():
        where = f"variants.{precision}"
        named.append((f"{where}.embedding", v.embedding))
        for graph in ("vision", "decoder"):
            spec: GraphSpec = getattr(v, graph)
            named.append((f"{where}.{graph}.file", spec.file))
            named += [(f"{where}.{graph}.external_data", e) for e in spec.external_data]
        named += [(f"{where}.engines.{e.graph}", e.file) for e in v.engines]
        if v.calibration and isinstance(v.calibration.get("artifact"), str):
            named.append((f"{where}.calibration.artifact", v.calibration["artifact"]))
    return named


def check_paths(bundle: Path, manifest: Manifest) -> None:
    """Every path the manifest names stays inside the bundle (runtime.paths)."""
    for where, rel in named_paths(manifest):
        inside(bundle, rel, f"{bundle / MANIFEST_NAME} {where}")


def check_external_data(bundle: Path, manifest: Manifest) -> None:
    """Every external-data file an ONNX graph names stays inside the graph's folder and is a file the manifest
    lists (so it is hashed too): onnxruntime and TensorRT would otherwise read whatever the graph says."""
    graphs = {spec.file for v in manifest.variants.values() for spec in (v.vision, v.decoder)}
    for rel in sorted(graphs):
        graph = bundle / rel
        if not graph.is_file():
            continue  # reported by verify_files / the runner, with the manifest's wording
        for location in external_data_locations(graph):
            data = inside(graph.parent, location, f"{graph} external data")
            listed = data.resolve().relative_to(bundle.resolve()).as_posix()
            if manifest.files and listed not in manifest.files:
                raise BundleError(f"{graph}: external data {location!r} is not a file the manifest lists (and "
                                  f"hashes); re-export the bundle")


def verify_files(bundle: Path, manifest: Manifest) -> None:
    for rel, expected in sorted(manifest.files.items()):
        file = bundle / rel
        if not file.is_file():
            raise BundleError(f"{file}: listed in the manifest but missing")
        actual = sha256_file(file)
        if actual != expected:
            raise BundleError(f"{file}: sha256 {actual[:12]}… does not match the manifest ({expected[:12]}…); "
                              "the file is corrupted or was modified — re-export the bundle")


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Write atomically (temp file + rename) so a crash never leaves a half-written manifest."""
    tmp = bundle / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, bundle / MANIFEST_NAME)
