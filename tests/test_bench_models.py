"""bench/models.py: the torch-free ResNet-18 and MobileNetV2 are valid, runnable, importable and deterministic."""
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import models  # noqa: E402
from ohq_tvm.frontend import load_onnx  # noqa: E402
from ohq_tvm.layers import find_layers  # noqa: E402

# ResNet-18: stem + 16 block convs + 3 downsample 1x1 convs, and the classifier.
# MobileNetV2: stem, 2 convs in the t=1 block, 3 in each of the other 16 blocks, the 1280 head (52 convs, 17 of
# them depthwise), and the classifier.
EXPECTED_LAYERS = {"resnet18": Counter(conv=20, dense=1),
                   "mobilenetv2": Counter(conv=35, depthwise=17, dense=1)}
EXPECTED_PARAMS_M = {"resnet18": 11.69, "mobilenetv2": 3.50}   # torchvision's counts incl. BN


@pytest.fixture(scope="module", params=list(models.BUILDERS))
def built(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, models.build(name, tmp_path_factory.mktemp(name) / f"{name}.onnx")


def test_valid_onnx(built):
    name, path = built
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert (model.ir_version, model.opset_import[0].version) == (9, 13)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name.split(".")[-1]
                 in ("weight", "bias", "scale"))   # BN running stats are buffers, not parameters
    assert params / 1e6 == pytest.approx(EXPECTED_PARAMS_M[name], abs=0.01)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["BatchNormalization"] == ops["Conv"]
    if name == "mobilenetv2":
        clips = [n for n in model.graph.node if n.op_type == "Clip"]
        assert clips and all(len(n.input) == 3 for n in clips)   # ReLU6 with min/max as inputs (opset 13)


def test_onnxruntime_runs(built):
    _, path = built
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
    (logits,) = sess.run(None, {"input": x})
    assert logits.shape == (1, 1000)
    assert np.isfinite(logits).all() and logits.std() > 0


def test_importer_finds_layers(built):
    name, path = built
    imported = load_onnx(path)
    assert imported.input_shape == (1, 3, 224, 224)
    assert "batch_norm" not in str(imported.mod)   # folded into the convs
    layers = find_layers(imported.mod)
    assert Counter(layer.kind for layer in layers) == EXPECTED_LAYERS[name]
    assert len(layers) == {"resnet18": 21, "mobilenetv2": 53}[name]
    assert layers[-1].weight_shape == (layers[-1].input_shape[-1], 1000)


def test_deterministic(built, tmp_path):
    name, path = built
    assert models.build(name, tmp_path / "again.onnx").read_bytes() == path.read_bytes()


def test_unknown_model(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        models.build("vgg16", tmp_path / "x.onnx")
