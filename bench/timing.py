"""Benchmark helpers: onnxruntime timers, the machine's description, result files and README blocks.

Side-by-side timing itself (`interleaved`) is `ohq_tvm.runtime`'s, which the compile flow uses too.
"""
from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ohq_tvm.runtime import median_ms

RESULTS = Path(__file__).parent / "results"


def ort_timer(path: str | Path, x: np.ndarray, threads: int, min_seconds: float = 0.3) -> Callable[[], float]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)
    return lambda: median_ms(lambda: sess.run(None, feed), min_seconds)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    from tvm.target import codegen
    return f"{cpu} (LLVM cpu {codegen.llvm_get_system_cpu()}), {platform.machine()}"


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def update_readme(section: str, markdown: str) -> None:
    """Replace the README block between <!-- bench:SECTION --> and <!-- /bench:SECTION -->."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{markdown.strip()}\n{end}{tail}")
