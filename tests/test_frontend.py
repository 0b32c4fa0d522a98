import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import EFFNET, FMNIST
from ohq_tvm.errors import OhqError
from ohq_tvm.frontend import load_onnx, parse_shape
from ohq_tvm.layers import find_layers


def op_names(mod) -> set[str]:
    import re
    return set(re.findall(r"R\.([a-z_.0-9]+)\(", mod["main"].script(show_meta=False)))


@pytest.mark.parametrize("model", [FMNIST, EFFNET], ids=["fmnist", "efficientnet"])
def test_numpy_folding_is_exactly_tvms_constant_folding(model, monkeypatch):
    """numpy folds the weights (BN into the convs, OHWI transposes) where FoldConstant compiled every
    expression with LLVM: the same module, the same bits."""
    import tvm
    from ohq_tvm import frontend
    folded = load_onnx(model).mod
    monkeypatch.setattr(frontend, "numpy_fold", tvm.transform.module_pass(lambda mod, _: mod, opt_level=0, name="Off"))
    tvm.ir.assert_structural_equal(folded, load_onnx(model).mod)


def test_fmnist_import_folds_batchnorm_and_lists_layers():
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(FMNIST)).graph.node}
    imported = load_onnx(FMNIST)
    assert imported.input_shape == (1, 1, 28, 28)
    assert not any("batch_norm" in op for op in op_names(imported.mod))
    layers = find_layers(imported.mod)
    kinds = [l.kind for l in layers]
    assert kinds.count("dense") == 1 and "depthwise" in kinds and "conv" in kinds
    assert [l.id for l in layers] == [l.id for l in find_layers(load_onnx(FMNIST).mod)]  # stable ids
    assert len({l.id for l in layers}) == len(layers)


def test_efficientnet_layer_table():
    layers = find_layers(load_onnx(EFFNET).mod)
    kinds = [l.kind for l in layers]
    assert (kinds.count("conv"), kinds.count("depthwise"), kinds.count("dense")) == (33, 16, 1)
    assert sum(l.weight_count for l in layers) == pytest.approx(4.6e6, rel=0.05)
    first = layers[0]
    assert first.weight_shape == (32, 3, 3, 3) and first.strides == (2, 2)
    assert first.input_shape == (1, 224, 224, 3) and first.output_shape == (1, 112, 112, 32)
    assert first.macs == 32 * 112 * 112 * 3 * 3 * 3
    depthwise = next(l for l in layers if l.kind == "depthwise")
    assert depthwise.weight_shape[3] == 1 and depthwise.groups == depthwise.input_shape[3]


def _tiny_model(path, input_type=TensorProto.FLOAT, dims=(1, 4, 8, 8)):
    w = helper.make_tensor("w", TensorProto.FLOAT, (8, 4, 3, 3), np.ones(8 * 4 * 9, np.float32))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                              [helper.make_tensor_value_info("x", input_type, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_dynamic_batch_needs_input_shape(tmp_path):
    path = _tiny_model(tmp_path / "dyn.onnx", dims=("N", 4, 8, 8))
    with pytest.raises(OhqError, match="dynamic dimensions.*--input-shape"):
        load_onnx(path)
    assert load_onnx(path, (2, 4, 8, 8)).input_shape == (2, 4, 8, 8)
    with pytest.raises(OhqError, match="does not fit"):
        load_onnx(path, (1, 3, 8, 8))


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), (b"", "empty file"), (b"\x08\x07garbage\xff\xfe", "not a readable ONNX model"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "m.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(OhqError, match=message):
        load_onnx(path)


def test_non_float_input_and_bad_shapes(tmp_path):
    with pytest.raises(OhqError, match="only float32"):
        load_onnx(_tiny_model(tmp_path / "i.onnx", input_type=TensorProto.INT64))
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    for bad in ("1,a", "0,3", ""):
        with pytest.raises(OhqError):
            parse_shape(bad)
