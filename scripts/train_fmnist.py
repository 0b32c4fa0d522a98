"""Train a small residual CNN on Fashion-MNIST and export it to ONNX with its BatchNorm layers kept.

Writes ohq_tvm/assets/fmnist_resnet.onnx (input "input" [1,1,28,28] = uint8/255, output "logits")
and ohq_tvm/assets/fmnist_test.npz (x uint8 [10000,28,28], y uint8 [10000]).
Needs the Debian package dataset-fashion-mnist; deterministic; a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import gzip
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ASSETS_DIR = Path(__file__).resolve().parents[1] / "ohq_tvm" / "assets"
SEED = 0
EPOCHS = 6
BATCH_SIZE = 128
PEAK_LR = 0.1


def read_idx(name: str, header_bytes: int) -> np.ndarray:
    with gzip.open(DATA_DIR / name) as f:
        return np.frombuffer(f.read(), np.uint8, offset=header_bytes)


def load_split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(f"{prefix}-images-idx3-ubyte.gz", header_bytes=16).reshape(-1, 28, 28)
    labels = read_idx(f"{prefix}-labels-idx1-ubyte.gz", header_bytes=8)
    return images, labels


def to_input(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images[:, None].astype(np.float32) / 255.0)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """Two 3x3 convs; a strided 1x1 projection shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(in_ch, out_ch, 3, stride)
        self.conv2 = conv_bn(out_ch, out_ch, 3)
        self.shortcut = conv_bn(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class SeparableBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = conv_bn(channels, channels, 3, groups=channels)
        self.pointwise = conv_bn(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pointwise(F.relu(self.depthwise(x))) + x)


def build_model() -> nn.Sequential:
    return nn.Sequential(
        conv_bn(1, 16, 3), nn.ReLU(),          # 28x28
        BasicBlock(16, 32, stride=2),          # 14x14
        SeparableBlock(32),
        BasicBlock(32, 64, stride=2),          # 7x7
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(SEED)
    steps_per_epoch = len(x) // BATCH_SIZE
    optimizer = torch.optim.SGD(model.parameters(), lr=PEAK_LR, momentum=0.9, nesterov=True, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, PEAK_LR, total_steps=EPOCHS * steps_per_epoch)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=generator)
        total_loss = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
            flip = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
            images = torch.where(flip, x[batch].flip(-1), x[batch])
            loss = F.cross_entropy(model(images), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item()
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total_loss / steps_per_epoch:.4f}", flush=True)


def inline_shared_initializers(model: onnx.ModelProto) -> None:
    """Replace `Identity(initializer)` nodes with their own copy of the initializer.

    A residual block's two BN biases get identical gradients, so they stay bit-identical; the exporter then
    stores the tensor once and aliases the other with an Identity node: an export artefact, not part of the net.
    """
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in initializers]:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        model.graph.initializer.append(copy)
        model.graph.node.remove(node)


def export_onnx(model: nn.Module, path: Path) -> None:
    model.eval()
    # Without constant folding the exporter keeps BatchNormalization (with running stats) instead of
    # folding it into the Conv weights: the compiler under test must see and fold BN itself.
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], do_constant_folding=False)
    exported = onnx.load(str(path))
    inline_shared_initializers(exported)
    onnx.checker.check_model(exported)
    onnx.save(exported, str(path))


def onnxruntime_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["logits"], {"input": image[None]})[0] for image in x.numpy()])


def main() -> None:
    start = time.time()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    train_images, train_labels = load_split("train")
    test_images, test_labels = load_split("t10k")
    x_train, y_train = to_input(train_images), torch.from_numpy(train_labels.astype(np.int64))
    x_test = to_input(test_images)

    model = build_model()
    train(model, x_train, y_train)
    train_seconds = time.time() - start

    ASSETS_DIR.mkdir(parents=True, exist_ok=True)
    onnx_path = ASSETS_DIR / "fmnist_resnet.onnx"
    export_onnx(model, onnx_path)
    np.savez_compressed(ASSETS_DIR / "fmnist_test.npz", x=test_images, y=test_labels)

    op_types = Counter(node.op_type for node in onnx.load(str(onnx_path)).graph.node)
    print("ONNX nodes:", dict(sorted(op_types.items())))
    assert op_types["BatchNormalization"] > 0, "BatchNorm was folded away during export"

    with torch.no_grad():
        torch_logits = model(x_test).numpy()
    ort_logits = onnxruntime_logits(onnx_path, x_test)
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    assert max_diff < 1e-4, f"onnxruntime differs from torch by {max_diff}"
    accuracy = float((ort_logits.argmax(1) == test_labels).mean())
    print(f"onnxruntime test top-1 {accuracy:.2%} on {len(test_labels)} images "
          f"(max |ort - torch| {max_diff:.1e}); training {train_seconds:.0f} s, total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
