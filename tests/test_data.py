from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ohq_tvm.data import fashion_mnist_test, imagenet_preprocess, photo_crops

FMNIST_ONNX = Path(__file__).resolve().parents[1] / "ohq_tvm" / "assets" / "fmnist_resnet.onnx"


def test_fashion_mnist_test_set() -> None:
    x, y = fashion_mnist_test()
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.array_equal(np.bincount(y), np.full(10, 1000))
    x_head, y_head = fashion_mnist_test(7)
    assert np.array_equal(x_head, x[:7]) and np.array_equal(y_head, y[:7])


def test_photo_crops_shape_and_range() -> None:
    crops = photo_crops(6, size=96)
    assert crops.shape == (6, 3, 96, 96) and crops.dtype == np.float32
    assert crops.min() >= -1.0 and crops.max() <= 1.0
    assert crops.std() > 0.1, "crops should be images, not constants"
    assert len({crop.tobytes() for crop in crops}) == 6


def test_photo_crops_deterministic_and_splits_disjoint() -> None:
    calib, evaluation = photo_crops(16, "calib", size=64), photo_crops(16, "eval", size=64)
    assert np.array_equal(calib, photo_crops(16, "calib", size=64))
    assert np.array_equal(evaluation[:5], photo_crops(5, "eval", size=64))
    assert not {crop.tobytes() for crop in calib} & {crop.tobytes() for crop in evaluation}


def test_photo_crops_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        photo_crops(1, split="train")


def test_imagenet_preprocess_resizes_and_normalizes() -> None:
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, 200:] = 255  # right half white: the centre crop straddles the edge
    x = imagenet_preprocess(image)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert x[:, :, 0].max() == -1.0 and x[:, :, -1].min() == 1.0
    assert imagenet_preprocess(image[:, :, 0], size=112).shape == (3, 112, 112)


def test_fmnist_onnx_keeps_batchnorm_and_is_accurate() -> None:
    model = onnx.load(str(FMNIST_ONNX))
    op_types = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" in op_types
    assert any(attr.name == "group" and attr.i > 1 for node in model.graph.node for attr in node.attribute)

    x, y = fashion_mnist_test(500)
    session = ort.InferenceSession(str(FMNIST_ONNX), providers=["CPUExecutionProvider"])
    predictions = np.array([session.run(["logits"], {"input": image[None]})[0].argmax() for image in x])
    assert (predictions == y).mean() >= 0.88
