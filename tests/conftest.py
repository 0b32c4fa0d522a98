import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "ohq_tvm" / "assets" / "fmnist_resnet.onnx"
EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
TUNING_LOGS = ROOT / "tuning_logs"


def copy_logs(dst: Path, target, oqa: bool = True) -> Path:
    """Copy this CPU's committed logs into work dir `dst`: MetaSchedule records and MQE caches and, with `oqa`,
    the OQA timings of `target`'s thread count (so a test runs warm and never writes to the committed logs)."""
    import shutil
    dirs = [target.cpu_key] + ([target.key] if oqa else [])
    for name in dirs:
        if (TUNING_LOGS / name).is_dir():
            shutil.copytree(TUNING_LOGS / name, dst / name, ignore=shutil.ignore_patterns("logs"),
                            dirs_exist_ok=True)
    return dst


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"ohq_tvm.{module}", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def fmnist_path() -> Path:
    return FMNIST


@pytest.fixture(scope="session")
def effnet_path() -> Path:
    return EFFNET


def layer_module(kind: str, rng, channels: int = 16, size: int = 9, clamp: str | None = None, tail: bool = False):
    """main(x) = [clamp](conv2d/matmul(x, W) + b) [* 0.5] as a Relax module (NHWC / OHWI), its weight and bias.

    kind: conv (3x3, stride 2, pad 1), depthwise, or dense (x [1, 3 * channels] @ W [3 * channels, 2 * channels]).
    """
    from tvm import relax
    bb = relax.BlockBuilder()
    if kind == "dense":
        shape, w = (1, 3 * channels), rng.standard_normal((3 * channels, 2 * channels)).astype(np.float32)
    else:
        groups = channels if kind == "depthwise" else 1
        shape = (1, size, size, channels)
        w = rng.standard_normal((channels, 3, 3, channels // groups)).astype(np.float32)
    b = rng.standard_normal(w.shape[-1] if kind == "dense" else w.shape[0]).astype(np.float32)
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "dense":
                y = bb.emit(relax.op.matmul(x, relax.const(w)))
            else:
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=2, padding=1, groups=groups,
                                               data_layout="NHWC", kernel_layout="OHWI"))
            y = bb.emit(relax.op.add(y, relax.const(b)))
            if clamp == "relu":
                y = bb.emit(relax.op.nn.relu(y))
            elif clamp == "relu6":
                y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            if tail:
                y = bb.emit(relax.op.multiply(y, relax.const(np.float32(0.5))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), w, b
