import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")
ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "ohq_tvm" / "assets" / "fmnist_resnet.onnx"
EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
TUNING_LOGS = ROOT / "tuning_logs"


def run_cli(module: str, *args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"ohq_tvm.{module}", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def fmnist_path() -> Path:
    return FMNIST


@pytest.fixture(scope="session")
def effnet_path() -> Path:
    return EFFNET
