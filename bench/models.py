"""Latency-only benchmark models, written with onnx.helper (no torch): ResNet-18 and MobileNetV2.

Architectures follow torchvision; weights are seeded random (He-normal convs, BatchNormalization with random
but sane statistics, which our frontend folds into the convs). Input "input" [1,3,224,224] float32, output
"logits" [1,1000]; opset 13, IR version 9. The files are deterministic: building twice gives identical bytes.

``python bench/models.py`` writes models/resnet18.onnx and models/mobilenetv2.onnx.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = ROOT / "models"
OPSET, IR_VERSION = 13, 9
INPUT_SHAPE = (1, 3, 224, 224)
CLASSES = 1000
SEED = 20240607

# MobileNetV2 inverted residuals: expansion t, output channels c, repeats n, first stride s.
MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class GraphBuilder:
    """Appends nodes and seeded initializers; each method returns the name of its output tensor."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def _name(self, op: str) -> str:
        return f"{op.lower()}{len(self.nodes)}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        name = self._name(op)
        self.nodes.append(helper.make_node(op, inputs, [output or name], name=name, **attrs))
        return output or name

    def conv_bn(self, x: str, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> str:
        fan_in = cin // groups * kernel * kernel
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin // groups, kernel, kernel)).astype(np.float32)
        name = self._name("Conv")
        pad = kernel // 2
        y = self.node("Conv", [x, self.const(f"{name}.weight", w)], kernel_shape=[kernel, kernel],
                      strides=[stride, stride], pads=[pad] * 4, group=groups)
        stats = {"scale": self.rng.uniform(0.8, 1.2, cout), "bias": self.rng.normal(0.0, 0.1, cout),
                 "mean": self.rng.normal(0.0, 0.1, cout), "var": self.rng.uniform(0.5, 1.5, cout)}
        bn = self._name("BatchNormalization")
        return self.node("BatchNormalization", [y] + [self.const(f"{bn}.{k}", v.astype(np.float32))
                                                       for k, v in stats.items()], epsilon=1e-5)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        if "relu6.min" not in {t.name for t in self.initializers}:
            self.const("relu6.min", np.array(0.0, np.float32))
            self.const("relu6.max", np.array(6.0, np.float32))
        return self.node("Clip", [x, "relu6.min", "relu6.max"])

    def classifier(self, x: str, channels: int) -> str:
        x = self.node("Flatten", [self.node("GlobalAveragePool", [x])], axis=1)
        bound = 1.0 / np.sqrt(channels)
        w = self.rng.uniform(-bound, bound, (CLASSES, channels)).astype(np.float32)
        b = self.rng.uniform(-bound, bound, CLASSES).astype(np.float32)
        name = self._name("Gemm")
        return self.node("Gemm", [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)],
                         output="logits", transB=1)

    def model(self, graph_name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, INPUT_SHAPE)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, (INPUT_SHAPE[0], CLASSES))],
            self.initializers)
        model = helper.make_model(graph, producer_name="ohq_tvm bench/models.py",
                                  opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        return model


def resnet18(seed: int = SEED) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x = g.relu(g.conv_bn("input", 3, 64, 7, stride=2))
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = g.relu(g.conv_bn(x, cin, cout, 3, stride))
            y = g.conv_bn(y, cout, cout, 3)
            shortcut = g.conv_bn(x, cin, cout, 1, stride) if stride != 1 or cin != cout else x
            x, cin = g.relu(g.node("Add", [y, shortcut])), cout
    g.classifier(x, cin)
    return g.model("resnet18")


def mobilenetv2(seed: int = SEED) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x, cin = g.relu6(g.conv_bn("input", 3, 32, 3, stride=2)), 32
    for expansion, cout, repeats, first_stride in MOBILENET_V2_BLOCKS:
        for i in range(repeats):
            stride, hidden = first_stride if i == 0 else 1, cin * expansion
            y = g.relu6(g.conv_bn(x, cin, hidden, 1)) if expansion != 1 else x
            y = g.relu6(g.conv_bn(y, hidden, hidden, 3, stride, groups=hidden))
            y = g.conv_bn(y, hidden, cout, 1)
            x, cin = (g.node("Add", [x, y]) if stride == 1 and cin == cout else y), cout
    x = g.relu6(g.conv_bn(x, cin, 1280, 1))
    g.classifier(x, 1280)
    return g.model("mobilenetv2")


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {"resnet18": resnet18, "mobilenetv2": mobilenetv2}


def build(name: str, path: str | Path) -> Path:
    """Write model `name` ("resnet18" | "mobilenetv2") to `path`, checked by onnx.checker."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
    model = BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def main(argv: list[str] | None = None) -> None:
    for name in argv or list(BUILDERS):
        print("->", build(name, MODELS_DIR / f"{name}.onnx"))


if __name__ == "__main__":
    main(sys.argv[1:])
