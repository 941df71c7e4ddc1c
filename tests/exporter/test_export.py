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
from posellm.checkpoint import CheckpointError
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


def test_locllm_training_layout_bundle_validates(locllm_bundle):
    """LocLLM's own training output (mlp2x_gelu; <im_patch> = vocab_size, bf16 LLM, 2 .bin shards): validated,
    and the embedding table keeps vocab_size rows (the image token is never looked up)."""
    assert _print_validation(locllm_bundle)["passed"]
    m = load_manifest(locllm_bundle)
    assert m.prompts.image_token_id == m.dims.vocab_size == 32000
    for precision, v in m.variants.items():
        assert np.load(locllm_bundle / v.embedding, mmap_mode="r").shape == (32000, m.dims.hidden_size), precision


def test_locllm_linear_training_layout_validates(tmp_path, locllm_tokenizer_dir):
    out = tiny.locllm_checkpoint(tmp_path / "locllm", locllm_tokenizer_dir, connector="linear", seed=3,
                                 safetensors=True)
    result = export_bundle(ExportConfig(out, tmp_path / "b", precisions=("fp32", "fp16")))
    print(f"export {result.seconds:.1f}s, peak RSS {result.peak_rss_mb:.0f} MB, sizes {result.file_sizes}")
    assert _print_validation(result.bundle)["passed"]


LLAMA = tiny.SHARED / "fixtures" / "llama-tokenizer"


@pytest.mark.skipif(not (LLAMA / "tokenizer.model").exists(),
                    reason=f"{LLAMA} not found (../shared is not part of a user's clone)")
def test_locllm_checkpoint_with_its_real_tokenizer_files(tmp_path):
    """The tokenizer files LocLLM's trainer saves (slow LlamaTokenizer: tokenizer.model + added_tokens.json with
    <im_patch> = 32000, no tokenizer.json) next to the 32000-row model: export, then free decoding = reference."""
    from runtime.estimator import Estimator
    tok = tmp_path / "tok"
    tok.mkdir()
    shutil.copy(LLAMA / "tokenizer.model", tok / "tokenizer.model")
    shutil.copy(LLAMA / "tokenizer_config.json", tok / "tokenizer_config.json")
    (tok / "added_tokens.json").write_text(json.dumps({"<im_patch>": 32000}))
    (tok / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    ckpt = tiny.locllm_checkpoint(tmp_path / "ck", tok, seed=7)
    bundle = export_bundle(ExportConfig(ckpt, tmp_path / "b", precisions=("fp32",), max_persons=2)).bundle
    m = load_manifest(bundle)
    assert m.prompts.image_token_id == m.dims.vocab_size == 32000 and m.prompts.prefix_ids == (1, 7084, 29901)
    image, boxes = tiny.random_image(4), [[10, 20, 100, 150]]
    ref = tiny.reference_estimator(ckpt, bundle).estimate(image, boxes)
    got = Estimator(bundle, decoding="free").estimate(image, boxes)
    assert [r.tokens for r in ref] == [g.tokens for g in got]


def test_tokenizer_disagreeing_with_config_names_both_ids(tmp_path, locllm_checkpoint):
    ckpt = tmp_path / "ck"
    shutil.copytree(locllm_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "im_patch_token": 31999}))
    with pytest.raises(InputError) as err:
        export_bundle(ExportConfig(ckpt, tmp_path / "b"))
    print(err.value)
    assert "<im_patch> id 32000" in str(err.value) and "image token id 31999" in str(err.value)
    assert not (tmp_path / "b").exists()


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
    assert dec.dynamic_ranges["prefix"] == (1, prefix)  # never empty: the prefix prefill has a masked dummy
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
    with pytest.raises(BundleError, match=rf"not supported.*versions \[{SCHEMA_VERSION}\]"):
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


def test_streamed_weights_are_the_merged_checkpoint(locllm_bundle, locllm_checkpoint):
    """Every weight matrix the streamed export wrote equals the eagerly loaded, LoRA-merged model's (cast to the
    variant dtype) bit for bit, as stored or transposed (MatMul constants): what the old whole-model export held."""
    from posellm.checkpoint import load_checkpoint
    model = load_checkpoint(locllm_checkpoint)
    model.merge_lora()
    state = model.state_dict()
    for precision, file, graph in _graphs(locllm_bundle):
        dtype = np.float16 if precision == "fp16" else np.float32
        matrices = {}
        for t in state.values():
            if t.dim() == 2:
                a = t.float().numpy().astype(dtype)
                matrices.setdefault(a.shape, []).append(a)
                matrices.setdefault(a.T.shape, []).append(np.ascontiguousarray(a.T))
        weights = [onnx.numpy_helper.to_array(t, base_dir=str(locllm_bundle / precision))
                   for t in graph.graph.initializer if len(t.dims) == 2 and min(t.dims) > 1]
        assert weights, file
        unmatched = [w.shape for w in weights if not any(np.array_equal(w, m) for m in matrices.get(w.shape, []))]
        assert unmatched == [], f"{file}: weights not found in the merged model: {unmatched}"


def test_external_data_path_equals_inline(tmp_path, tiny_checkpoint, tiny_bundle, monkeypatch):
    """Full-width graphs (> 1 GB) stream into `<graph>.data`: forced here at tiny size, the bundle validates, its
    manifest lists the data files, and onnxruntime gives bit-identical outputs to the inline bundle's."""
    import onnxruntime as ort
    from exporter import onnx_export
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    result = export_bundle(ExportConfig(tiny_checkpoint, out, precisions=("fp32", "fp16"), max_persons=3))
    assert result.validation["passed"]
    m = load_manifest(out)
    rng = np.random.default_rng(0)
    for precision, v in m.variants.items():
        assert v.vision.external_data == (f"{precision}/vision.onnx.data",)
        assert v.decoder.external_data == (f"{precision}/decoder.onnx.data",)
        inline = load_manifest(tiny_bundle).variants[precision]
        assert inline.vision.external_data == ()
        px = rng.standard_normal((2, 3, m.preprocess.crop_size, m.preprocess.crop_size)).astype(np.float32)
        a, b = (ort.InferenceSession(str(root / g.vision.file)).run(None, {"pixel_values": px})[0]
                for root, g in ((out, v), (tiny_bundle, inline)))
        print(f"{precision}: external vs inline vision max diff {np.abs(a.astype(float) - b).max():.1e} (exact)")
        assert np.array_equal(a, b)


def test_manifest_records_bytes_and_peak_rss(tiny_bundle):
    """Each variant's export stats: its bytes on disk (graphs + data + embedding table) and a peak RSS."""
    m = load_manifest(tiny_bundle)
    for precision, v in m.variants.items():
        files = [v.vision.file, v.decoder.file, v.embedding, *v.vision.external_data, *v.decoder.external_data]
        assert v.export is not None, precision
        assert v.export.bytes == sum((tiny_bundle / f).stat().st_size for f in files), precision
        assert 50e6 < v.export.peak_rss_bytes < 8e9, precision  # the interpreter + torch alone are > 50 MB
        assert v.export.export_seconds > 0 and v.export.validation_seconds > 0


def test_bad_export_options():
    with pytest.raises(InputError, match="int4"):
        ExportConfig(Path("x"), Path("y"), precisions=("int4",))
    with pytest.raises(InputError, match="logits_positions=2"):
        ExportConfig(Path("x"), Path("y"), logits_positions=2)
