"""onnxruntime's INT8 baseline: static QDQ quantization, per-channel INT8 weights, UINT8 activations, MinMax.

Calibration data is always disjoint from the evaluation data:
- EfficientNet-Lite0: calibrated on `photo_crops(100, "calib")`, evaluated (top-1 agreement and KL against the
  FP32 model) on `photo_crops(200, "eval")`.
- Fashion-MNIST model: the repo ships only the 10,000 test images, so calibration takes test images
  9000-9999 and accuracy is reported on images 0-8999 (disjoint) and, for comparison with figures on the
  full set, on all 10,000 (which include the calibration images).

Two configurations: "int8" (full-range weights) and "int8_reduce_range" (7-bit weights, which ORT recommends on
x86 without VNNI; on this AVX2 machine it is the more accurate one as deployed, see `quantize`).

``python bench/ort_int8.py`` writes bench/results/ort_int8.json (accuracy only, no timing).
"""
from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import write  # noqa: E402
from ohq_tvm import data, evaluate  # noqa: E402
from ohq_tvm.errors import OhqError  # noqa: E402

EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
FMNIST = ROOT / "ohq_tvm" / "assets" / "fmnist_resnet.onnx"
FMNIST_CALIB = slice(9000, 10000)
FMNIST_EVAL = slice(0, 9000)
EFFNET_CALIB, EFFNET_EVAL = 100, 200
SYSTEMS = {"int8": False, "int8_reduce_range": True}   # name -> reduce_range


def _input_name_and_shape(path: Path) -> tuple[str, tuple[int, ...]]:
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    (inp,) = [i for i in model.graph.input if i.name not in initializers]
    return inp.name, tuple(d.dim_value for d in inp.type.tensor_type.shape.dim)


def quantize(model_path: str | Path, calibration: np.ndarray, out_path: str | Path,
             reduce_range: bool = False) -> Path:
    """Static QDQ INT8 model of `model_path`, calibrated (MinMax) on `calibration` [N, *input shape[1:]].

    `reduce_range` quantizes weights to 7 bits, which ORT recommends on x86 without VNNI (this machine): its
    u8s8 kernels add pairs of products in saturating int16 there, and full-range weights overflow.
    """
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_path, out_path = Path(model_path), Path(out_path)
    name, shape = _input_name_and_shape(model_path)
    calibration = np.asarray(calibration, np.float32)
    if calibration.shape[1:] != shape[1:] or len(calibration) == 0 or len(calibration) % shape[0]:
        raise OhqError(f"calibration data of shape {calibration.shape} does not fit input '{name}' {shape}")
    batches = calibration.reshape(-1, *shape)   # the model's batch size is fixed

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter({name: batch} for batch in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # Shape inference plus ORT's graph optimizations (BatchNorm folded into Conv), as ORT recommends.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_path), str(prepared))
        quantize_static(str(prepared), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return out_path


def agreement(fp32_path: str | Path, int8_path: str | Path, images: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, mean KL(softmax fp32 || softmax int8) and top-5 containment over `images`."""
    reference = evaluate.onnx_predictor(fp32_path)(images)
    return asdict(evaluate.agreement(reference, evaluate.onnx_predictor(int8_path)(images)))


def fmnist_accuracy(paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Top-1 of each system (name -> ONNX path) on test images 0-8999 and on all 10,000."""
    images, labels = data.fashion_mnist_test()
    result = {}
    for system, path in paths.items():
        logits = evaluate.onnx_predictor(path)(images)
        result[system] = {"top1_test_0_8999": evaluate.top1(logits[FMNIST_EVAL], labels[FMNIST_EVAL]),
                          "top1_test_all": evaluate.top1(logits, labels)}
    return result


def main() -> None:
    fmnist_calib = data.fashion_mnist_test()[0][FMNIST_CALIB]
    effnet_calib, effnet_eval = data.photo_crops(EFFNET_CALIB, "calib"), data.photo_crops(EFFNET_EVAL, "eval")
    fmnist, effnet = {"fp32": FMNIST}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for system, reduce_range in SYSTEMS.items():
            fmnist[system] = quantize(FMNIST, fmnist_calib, Path(tmp) / f"fmnist_{system}.onnx", reduce_range)
            int8 = quantize(EFFNET, effnet_calib, Path(tmp) / f"effnet_{system}.onnx", reduce_range)
            effnet[system] = agreement(EFFNET, int8, effnet_eval)
        results = {
            "config": "onnxruntime.quantization.quantize_static after quant_pre_process: QDQ, per-channel QInt8 "
                      "weights, QUInt8 activations, MinMax calibration; int8_reduce_range: 7-bit weights",
            "fmnist_resnet": {"calibration": "test images 9000-9999", **fmnist_accuracy(fmnist)},
            "efficientnet_lite0": {"calibration": f'photo_crops({EFFNET_CALIB}, "calib")',
                                   "evaluation": f'photo_crops({EFFNET_EVAL}, "eval")', "vs_fp32": effnet},
        }
    print(json.dumps(results, indent=1))
    print("->", write("ort_int8.json", results))


if __name__ == "__main__":
    main()
