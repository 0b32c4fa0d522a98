"""bench/ort_int8.py: onnxruntime's static per-channel QDQ INT8 baseline on the Fashion-MNIST model."""
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import ort_int8  # noqa: E402
from ohq_tvm import data, evaluate  # noqa: E402
from ohq_tvm.errors import OhqError  # noqa: E402

EVAL = slice(0, 1000)   # disjoint from the calibration images 9000-9999
# Measured on the first 1000 test images: FP32 92.5 %, INT8 92.2 % (1.7 % of predictions change). The standard
# error of a paired accuracy difference with that disagreement rate is sqrt(0.017/1000) = 0.4 pt, so a
# 2-point bound fails only on a real regression of the quantized model, not on noise.
MAX_ACCURACY_DROP = 0.02


@pytest.fixture(scope="module")
def fmnist_test():
    return data.fashion_mnist_test()


@pytest.fixture(scope="module")
def int8_path(fmnist_path, fmnist_test, tmp_path_factory) -> Path:
    return ort_int8.quantize(fmnist_path, fmnist_test[0][ort_int8.FMNIST_CALIB],
                             tmp_path_factory.mktemp("ort") / "fmnist_int8.onnx")


def weight_dequantizers(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int8 weight, scale) of every DequantizeLinear that reads an INT8 initializer."""
    model = onnx.load(str(path))
    init = {t.name: t for t in model.graph.initializer}
    return [(numpy_helper.to_array(init[n.input[0]]), numpy_helper.to_array(init[n.input[1]]))
            for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in init
            and init[n.input[0]].data_type == onnx.TensorProto.INT8]


def test_qdq_per_channel(fmnist_path, int8_path):
    ops = {n.op_type for n in onnx.load(str(int8_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = weight_dequantizers(int8_path)
    fp32 = onnx.load(str(fmnist_path))
    assert len(weights) == sum(n.op_type in ("Conv", "Gemm") for n in fp32.graph.node)
    for q, scale in weights:
        assert scale.shape == (q.shape[0],)   # one scale per output channel (Gemm is transB=1)
        assert np.abs(q).max() > 64           # full 8-bit range


def test_reduce_range_uses_7_bit_weights(fmnist_path, fmnist_test, tmp_path):
    path = ort_int8.quantize(fmnist_path, fmnist_test[0][9900:], tmp_path / "rr.onnx", reduce_range=True)
    assert max(np.abs(q).max() for q, _ in weight_dequantizers(path)) <= 64


def test_accuracy_close_to_fp32(fmnist_path, int8_path, fmnist_test):
    images, labels = fmnist_test[0][EVAL], fmnist_test[1][EVAL]
    fp32 = evaluate.top1(evaluate.onnx_predictor(fmnist_path)(images), labels)
    int8 = evaluate.top1(evaluate.onnx_predictor(int8_path)(images), labels)
    print(f"fmnist test[0:1000] top-1: fp32 {fp32:.3f}, onnxruntime int8 {int8:.3f}")
    assert fp32 > 0.88
    assert fp32 - int8 <= MAX_ACCURACY_DROP


def test_agreement(fmnist_path, int8_path, fmnist_test):
    images = fmnist_test[0][:200]
    same = ort_int8.agreement(fmnist_path, fmnist_path, images)
    assert same["top1_agreement"] == 1.0 and same["mean_kl"] == pytest.approx(0.0, abs=1e-9)
    quantized = ort_int8.agreement(fmnist_path, int8_path, images)
    assert 0.9 < quantized["top1_agreement"] <= 1.0
    assert 0.0 < quantized["mean_kl"] < 0.1


def test_calibration_must_fit_the_input(fmnist_path, tmp_path):
    with pytest.raises(OhqError, match="does not fit input"):
        ort_int8.quantize(fmnist_path, np.zeros((4, 3, 28, 28), np.float32), tmp_path / "x.onnx")
    with pytest.raises(OhqError, match="does not fit input"):
        ort_int8.quantize(fmnist_path, np.zeros((0, 1, 28, 28), np.float32), tmp_path / "x.onnx")
