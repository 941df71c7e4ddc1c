"""Exporter: tiny models → bundles that pass export-time validation; graph structure; atomicity; bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import tiny
from exporter import bundle as bundle_mod
from exporter.bundle import ExportConfig, export_bundle
from exporter.trt_ops import unsupported_ops
from posellm.checkpoint import CheckpointError, save_locllm
from runtime.errors import BundleError, InputError
from runtime.manifest import SCHEMA_VERSION, Manifest, load_manifest


def _graphs(bundle: Path):
    m = load_manifest(bundle)
    for precision, v in m.variants.items():
        for graph in (v.vision, v.decoder):
            yield precision, graph.file, onnx.load(str(bundle / graph.file))


def _print_validation(bundle: Path) -> dict:
    report = json.loads((bundle / "validation.json").read_text())
    for precision, checks in report["variants"].items():
        for c in checks:
            print(f"{precision:5} {c['output']:15} max_abs={c['max_abs']:.3e} tol={c['tolerance']:.3e}")
    return report


def test_native_mlp_bundle_validates(tiny_bundle):
    """fp32 + fp16, MLP projector, native checkpoint with unmerged LoRA (fixture): every check within tolerance."""
    report = _print_validation(tiny_bundle)
    assert report["passed"]
    assert set(report["variants"]) == {"fp32", "fp16"}
    names = {c["output"] for c in report["variants"]["fp32"]}
    calls = ["prefix", "suffix", "step1", "step2", "step3"]
    assert names == {"image_embeds"} | {f"logits/{c}" for c in calls} | {
        f"{c}/{out}" for c in calls for out in ("max_prob", "argmax", "digit_argmax")}


def test_locllm_linear_bundle_validates(tmp_path, tokenizer_dir, capsys):
    model = tiny.tiny_model(tiny.tiny_config(tokenizer_dir, connector="linear"), seed=3)
    save_locllm(model, tmp_path / "locllm", tokenizer_dir)
    result = export_bundle(ExportConfig(tmp_path / "locllm", tmp_path / "b", precisions=("fp32", "fp16")))
    print(f"export {result.seconds:.1f}s, peak RSS {result.peak_rss_mb:.0f} MB, sizes {result.file_sizes}")
    assert _print_validation(result.bundle)["passed"]


def test_graphs_pass_checker_and_trt_op_list(tiny_bundle):
    """onnx.checker full check; only ops in TensorRT 10's ONNX-parser list (exporter/trt_ops.py names the source)."""
    for precision, name, model in _graphs(tiny_bundle):
        onnx.checker.check_model(model, full_check=True)
        ops = {n.op_type for n in model.graph.node}
        assert not unsupported_ops(ops), f"{name}: unsupported by TensorRT 10: {unsupported_ops(ops)}"


def test_graph_contract(tiny_bundle):
    m = load_manifest(tiny_bundle)
    for precision, name, model in _graphs(tiny_bundle):
        ops = {n.op_type for n in model.graph.node}
        assert "Resize" not in ops, f"{name}: position embedding must be folded, found Resize"
        for init in model.graph.initializer:
            arr = onnx.numpy_helper.to_array(init)
            if arr.dtype.kind == "f":
                assert np.isfinite(arr).all(), f"{name}: non-finite constant {init.name}"
        for node in model.graph.node:
            if node.op_type == "Constant":
                arr = onnx.numpy_helper.to_array(node.attribute[0].t)
                if arr.dtype.kind == "f":
                    assert np.isfinite(arr).all(), f"{name}: non-finite Constant {node.name}"
    dec = m.variant("fp32").decoder
    assert [t.name for t in dec.inputs][:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert len(dec.inputs) == 3 + 4 * m.dims.num_layers  # shared-prefix K/V + past K/V per layer
    shapes = {t.name: t.shape for t in dec.inputs}
    assert shapes["prefix_key_values.0.key"] == ("persons", m.dims.num_kv_heads, "prefix", m.dims.head_dim)
    assert shapes["past_key_values.0.key"] == ("batch", m.dims.num_kv_heads, "past", m.dims.head_dim)
    prefix = len(m.prompts.prefix_ids) + m.prompts.num_image_tokens
    assert dec.dynamic_ranges["prefix"] == (0, prefix)
    reshapes = [n for _, name, model in _graphs(tiny_bundle) if "decoder" in name
                for n in model.graph.node if n.op_type == "Reshape"]
    assert reshapes and all(a.name == "allowzero" and a.i == 1 for n in reshapes for a in n.attribute)
    assert dec.outputs[0].shape == ("batch", "logit_positions", m.dims.vocab_size)
    assert m.dims.logits_positions >= 4
    assert m.variant("fp16").decoder.inputs[0].dtype == "float16"
    assert m.variant("fp16").decoder.outputs[0].dtype == "float32"  # logits come back in fp32


def test_manifest_lists_every_file_with_hash(tiny_bundle):
    m = load_manifest(tiny_bundle, verify=True)
    on_disk = {str(p.relative_to(tiny_bundle)) for p in tiny_bundle.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(m.files)
    assert len(m.source_checkpoint_sha256) == 64
    assert m.prompts.answer_template_ids is not None and len(m.prompts.answer_template_ids) == 13
    assert "onnxruntime" in m.library_versions and "torch" in m.library_versions


def test_manifest_round_trip_and_version_rejection(tiny_bundle, tmp_path):
    m = load_manifest(tiny_bundle)
    assert Manifest.from_json(m.to_json()) == m
    data = json.loads(m.to_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(BundleError, match=r"not supported.*versions \[2, 3\]"):
        Manifest.from_json(json.dumps(data))
    data["schema_version"] = SCHEMA_VERSION
    data["dims"]["surprise"] = 1
    with pytest.raises(BundleError, match="unknown keys"):
        Manifest.from_json(json.dumps(data))


def test_interrupted_export_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while exporting the decoder")
    monkeypatch.setattr(bundle_mod, "export_decoder", boom)
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_bundle(ExportConfig(tiny_checkpoint, out))
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"


def test_existing_out_dir_refused_without_overwrite(tmp_path, tiny_checkpoint):
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(InputError, match="--overwrite"):
        export_bundle(ExportConfig(tiny_checkpoint, out))


def test_checkpoint_without_tokenizer_names_missing_files(tmp_path, tiny_checkpoint):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    for f in ckpt.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer: expected tokenizer\.json and/or tokenizer\.model"):
        export_bundle(ExportConfig(ckpt, tmp_path / "b", validate=False))
    assert not (tmp_path / "b").exists()


def test_bad_export_options():
    with pytest.raises(InputError, match="int4"):
        ExportConfig(Path("x"), Path("y"), precisions=("int4",))
    with pytest.raises(InputError, match="logits_positions=2"):
        ExportConfig(Path("x"), Path("y"), logits_positions=2)
