"""Peak memory and wall time of `python -m ohq_tvm.compile` on EfficientNet-Lite0 (whole flow, warm kernel logs).

Writes bench/results/memory.json. Goal: peak resident memory < 4 GiB.
"""
from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import machine, update_readme, write  # noqa: E402

MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
GOAL_GIB = 4.0


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and its children (the flow's builder / runner pools included)."""
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # the committed logs without the MQE cache: MQE's simulation is built and run, as on a new model
        shutil.copytree(ROOT / "tuning_logs", f"{tmp}/logs", ignore=shutil.ignore_patterns("logs", "mqe"))
        start = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "ohq_tvm.compile", str(MODEL), "--target", "llvm",
                                  "--work-dir", f"{tmp}/logs", "--output", f"{tmp}/m.so"],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        process, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            peak = max(peak, tree_rss(process))
            time.sleep(0.2)
        seconds = time.monotonic() - start
        if child.returncode != 0:
            sys.exit(f"compile failed: {child.stderr.read().strip()[-2000:]}")
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20     # KiB -> GiB
    peak_gib = peak / 2**30
    path = write("memory.json", {"machine": machine(), "model": "efficientnet_lite0",
                                 "command": "python -m ohq_tvm.compile models/efficientnet_lite0.onnx --target llvm",
                                 "peak_rss_gib": round(peak_gib, 3), "largest_process_gib": round(largest, 3),
                                 "seconds": round(seconds, 1), "goal_gib": GOAL_GIB})
    markdown = (f"Compiling EfficientNet-Lite0 (whole flow; kernel tuning logs present, MQE run afresh): peak resident memory "
                f"{peak_gib:.2f} GiB summed over the compiler's processes (largest single process {largest:.2f} GiB; "
                f"goal < {GOAL_GIB:.0f} GiB), {seconds:.0f} s wall, on {machine()}.")
    print(markdown)
    update_readme("memory", markdown)
    print("->", path)


if __name__ == "__main__":
    main()
