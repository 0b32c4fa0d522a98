"""FP32: our compiled EfficientNet-Lite0 vs onnxruntime, 1 and 2 threads, interleaved in one run.

Writes bench/results/fp32.json. Goal: ours <= 1.3x onnxruntime.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import machine, ort_timer, update_readme, write  # noqa: E402
from ohq_tvm.compile import Options, compile_onnx  # noqa: E402
from ohq_tvm.runtime import Model, interleaved, set_threads  # noqa: E402

MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
THREADS = (1, 2)


def main() -> None:
    compiled = compile_onnx(MODEL, "llvm", work_dir=ROOT / "tuning_logs", threads=2,
                            options=Options(uniform="FP32", tune_trials=int(os.environ.get("TUNE_TRIALS", "32"))))
    ours = Model(compiled.executable)
    x = np.random.default_rng(0).standard_normal(compiled.imported.input_shape, dtype=np.float32)

    def ours_at(threads: int):
        def measure() -> float:
            set_threads(threads)
            return ours.time_ms(x, min_seconds=0.3)
        return measure

    timers = {}
    for t in THREADS:
        timers[f"onnxruntime/{t}"] = ort_timer(MODEL, x, t)
        timers[f"ohq_tvm/{t}"] = ours_at(t)
    medians = interleaved(timers, rounds=int(os.environ.get("ROUNDS", "7")))
    rows = [{"model": "efficientnet_lite0", "system": name.split("/")[0] + " fp32", "threads": int(name.split("/")[1]),
             "median_ms": round(ms, 4)} for name, ms in medians.items()]
    ratios = {t: medians[f"ohq_tvm/{t}"] / medians[f"onnxruntime/{t}"] for t in THREADS}
    path = write("fp32.json", {"machine": machine(), "rows": rows,
                               "ratio_ours_vs_onnxruntime": {str(t): round(r, 3) for t, r in ratios.items()},
                               "goal": "<= 1.3"})
    table = ["| system | threads | median ms | ours / onnxruntime |", "|---|---|---|---|"]
    for row in rows:
        ratio = f"{ratios[row['threads']]:.2f}x" if row["system"].startswith("ohq_tvm") else ""
        table.append(f"| {row['system']} | {row['threads']} | {row['median_ms']:.2f} | {ratio} |")
    markdown = "\n".join(table) + f"\n\nEfficientNet-Lite0 FP32, batch 1, measured on {machine()}."
    print(markdown)
    update_readme("fp32", markdown)
    print("->", path)


if __name__ == "__main__":
    main()
