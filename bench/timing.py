"""Side-by-side latency: every system timed in the same rounds, so machine noise hits all alike."""
from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def ort_timer(path: str | Path, x: np.ndarray, threads: int, min_seconds: float = 0.3) -> Callable[[], float]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    sess.run(None, feed)

    def measure() -> float:
        samples = []
        deadline = time.perf_counter() + min_seconds
        while len(samples) < 5 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            sess.run(None, feed)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3
    return measure


def interleaved(timers: dict[str, Callable[[], float]], rounds: int = 7) -> dict[str, float]:
    """Median over rounds of each timer's median; each round runs every timer once, in turn."""
    runs: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            time.sleep(0.05)    # let the previous system's spinning worker threads park before the next
            runs[name].append(timer())
    return {name: statistics.median(values) for name, values in runs.items()}


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
