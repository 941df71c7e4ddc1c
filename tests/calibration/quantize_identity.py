"""What `quantize` wrote, as digests: the stored bytes of every initializer of both decoder forms and the check
and validation figures of `quantization.json`. Recorded once from the pre-streaming `quantize` on the shipped model
(`python tests/calibration/quantize_identity.py`), compared by test_quantize_identity.py against the current one.

Every setting is explicit (IDENTITY_SETTINGS): the identity must not move when a default does."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "posellm-small"
RECORD = Path(__file__).resolve().parent / "data" / "quantize_identity.json"
# quantize_bundle keywords per case; `coco`, `images`, `checkpoint` are added by the caller
IDENTITY_SETTINGS: dict[str, dict[str, Any]] = {
    case: {"bits": 4, "block_size": 32, "method": method, "samples": 4, "lm_head": True, "lm_head_bits": 4,
           "accuracy_level": 4,
           "damp": 0.01, "seed": 0, "threads": 1, "name": f"int4_{method}"}
    for case, method in (("rtn", "rtn"), ("gptq", "gptq"))}
SYNTHETIC_COCO = {"num_images": 2, "seed": 7}  # training/data/synthetic.py: the calibration crops (GPTQ's)
EXPORT = {"precisions": ("fp32", "fp16"), "max_persons": 3, "validate": False}


def stored_bytes(tensor: onnx.TensorProto, base: Path) -> bytes:
    """An initializer's bytes as stored (int4 packed two per byte), inline or external."""
    if external_data_helper.uses_external_data(tensor):
        info = {e.key: e.value for e in tensor.external_data}
        with open(base / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"]))
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


def graph_digests(path: Path) -> dict[str, Any]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: {"dtype": onnx.TensorProto.DataType.Name(t.data_type), "dims": list(t.dims),
                      "sha256": hashlib.sha256(stored_bytes(t, path.parent)).hexdigest()}
             for t in model.graph.initializer}
    nodes = hashlib.sha256(b"".join(n.SerializeToString(deterministic=True) for n in model.graph.node)).hexdigest()
    return {"initializers": dict(sorted(inits.items())), "nodes_sha256": nodes}


def figures(artifact: dict[str, Any]) -> dict[str, Any]:
    """The numbers quantize reports about the weights it chose: checks, validation, per-weight output errors."""
    # per-weight "bits" came after the record (every weight 4 there, lm_head_bits=4): not part of the identity
    weights = {n: {k: v for k, v in w.items() if k != "bits"} for n, w in artifact["weights"].items()}
    return {k: artifact[k] for k in ("checks", "validation", "output_error")} | {
        "weights": weights, "data_sha256": artifact["data"].get("sha256"), "sizes": artifact["sizes"]}


def variant_record(bundle: Path, name: str) -> dict[str, Any]:
    from runtime.manifest import load_manifest
    v = load_manifest(bundle).variants[name]
    artifact = json.loads((bundle / name / "quantization.json").read_text())
    return {"forms": {"onnxruntime": graph_digests(bundle / v.decoder.file),
                      "tensorrt": graph_digests(bundle / v.form("tensorrt").decoder.file)},
            "figures": figures(artifact)}


def prepare(work: Path) -> tuple[Path, Path]:
    """The shipped model exported to fp32 + fp16, and the synthetic COCO set of the calibration crops."""
    from exporter.bundle import ExportConfig, export_bundle
    from training.data.synthetic import SyntheticConfig, generate_dataset
    bundle = work / "bundle"
    export_bundle(ExportConfig(MODEL, bundle, **EXPORT))
    coco = generate_dataset(SyntheticConfig(**SYNTHETIC_COCO), work / "coco")
    return bundle, coco


def run_case(bundle: Path, coco: Path, case: str) -> dict[str, Any]:
    from calibration.quantize import QuantizeConfig, quantize_bundle
    s = IDENTITY_SETTINGS[case]
    quantize_bundle(QuantizeConfig(bundle, coco=coco / "person_keypoints.json", images=coco / "images",
                                   checkpoint=MODEL, **s), log=lambda _: None)
    return variant_record(bundle, s["name"])


# CPU features that pick onnxruntime's (MLAS) and OpenBLAS's kernels: the check and validation figures are float
# results of those kernels, so they are exact only on a machine with the same features and library versions.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile")


def environment() -> dict[str, Any]:
    """What the figures' float kernels depend on: library versions and the CPU's instruction-set features."""
    import numpy
    import onnxruntime
    import torch
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__, "torch": torch.__version__,
            "cpu_flags": sorted(flags & set(ISA_FLAGS))}


def record(work: Path) -> dict[str, Any]:
    bundle, coco = prepare(work)
    return {"settings": IDENTITY_SETTINGS, "export": {**EXPORT, "precisions": list(EXPORT["precisions"])},
            "synthetic_coco": SYNTHETIC_COCO, "cases": {c: run_case(bundle, coco, c) for c in IDENTITY_SETTINGS}}


def record_environment(work: Path, made_by: str) -> dict[str, Any]:
    """The figures of this machine's environment, from the code at `made_by` (a commit whose weights match the
    record's byte for byte): the exact reference for later code on a machine like this one."""
    bundle, coco = prepare(work)
    return {"environment": environment(), "made_by": made_by,
            "figures": {c: run_case(bundle, coco, c)["figures"] for c in IDENTITY_SETTINGS}}


if __name__ == "__main__":
    # `python tests/calibration/quantize_identity.py` writes the record anew (only ever from the pre-streaming code);
    # `... --environment COMMIT` adds this machine's figures, made by the code checked out (at COMMIT).
    import tempfile
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        if sys.argv[1:2] == ["--environment"]:
            out = json.loads(RECORD.read_text())
            entry = record_environment(Path(tmp), sys.argv[2])
            out["figures_by_environment"] = [e for e in out.get("figures_by_environment", [])
                                             if e["environment"] != entry["environment"]] + [entry]
        else:
            out = record(Path(tmp))
    staged = RECORD.with_suffix(".json.tmp")
    staged.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    staged.replace(RECORD)
    print(f"wrote {RECORD}")
