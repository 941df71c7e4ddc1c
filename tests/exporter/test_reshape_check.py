"""The export-time Reshape check: every graph of a bundle passes; spec-invalid target shapes are named."""
from __future__ import annotations

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporter.onnx_export import check_reshapes, literal_zero_reshapes
from exporter.reshape_check import reshape_problems
from runtime.manifest import load_manifest


def test_every_bundle_graph_has_spec_valid_reshapes(tiny_bundle):
    m = load_manifest(tiny_bundle)
    checked = 0
    for precision, v in m.variants.items():
        for spec in (v.vision, v.decoder):
            model = onnx.load(str(tiny_bundle / spec.file), load_external_data=False)
            reshapes = sum(n.op_type == "Reshape" for n in model.graph.node)
            problems = reshape_problems(model, spec.dynamic_ranges)
            print(f"{spec.file}: {reshapes} Reshapes, {len(problems)} problems")
            assert reshapes and not problems, problems
            checked += 1
    assert checked == 2 * len(m.variants)


class _OldGrouping(torch.nn.Module):
    """The decoder's pre-fix shared-prefix grouping: -1 for the rows per person beside a possibly-0 prefix length."""

    def forward(self, scores: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        persons, prefix_len = prefix.shape[0], prefix.shape[2]
        return scores.reshape(persons, 2, -1, 3, prefix_len).sum(2)


def test_export_refuses_minus_one_beside_an_empty_dim(tmp_path):
    args = (torch.randn(4, 2, 3, 5), torch.randn(2, 2, 5, 8))
    axes = {"scores": {0: "batch", 3: "prefix"}, "prefix": {0: "persons", 2: "prefix"}}
    torch.onnx.export(_OldGrouping(), args, str(tmp_path / "old.onnx"), input_names=["scores", "prefix"],
                      output_names=["out"], dynamic_axes=axes, opset_version=17, dynamo=False)
    model = onnx.load(str(tmp_path / "old.onnx"))
    literal_zero_reshapes(model)  # as the exporter does: allowzero=1, so a 0 means 0
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(RuntimeError, match=r"spec-invalid Reshape.*-1 beside a dimension that may be 0"):
        check_reshapes(tmp_path / "old.onnx", {"batch": (1, 8), "persons": (1, 4), "prefix": (0, 5)})
    # The same graph with a prefix that is never empty is valid: the check uses the exported ranges.
    check_reshapes(tmp_path / "old.onnx", {"batch": (1, 8), "persons": (1, 4), "prefix": (1, 5)})


def _reshape_model(shape: list[int], allowzero: int) -> onnx.ModelProto:
    node = helper.make_node("Reshape", ["x", "shape"], ["y"], name="r", allowzero=allowzero)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 0, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [helper.make_tensor("shape", TensorProto.INT64, [len(shape)], shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shape,allowzero,error", [
    ([2, 0, -1], 1, "-1 beside a dimension that may be 0"),
    ([-1, 3, -1], 0, "more than one -1"),
    ([2, -2, 3], 0, "negative size other than -1"),
    ([2, 0, -1], 0, None),  # allowzero=0: the 0 copies the input dim — valid
    ([2, 0, 3], 1, None),
])
def test_constant_target_shapes(shape, allowzero, error):
    problems = reshape_problems(_reshape_model(shape, allowzero))
    print(shape, allowzero, problems)
    if error is None:
        assert problems == []
    else:
        assert len(problems) == 1 and error in problems[0] and "Reshape r" in problems[0]
