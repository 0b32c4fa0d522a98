"""FP32: our compiled models vs onnxruntime, 1 and 2 threads, interleaved in one run.

Two builds of each model: with the tuning records (`tuning_logs`: the best of MetaSchedule's search and the
fixed rule) and with no records at all (an empty work dir, no search: `tune`'s fixed rule alone, what a new
model or a cross-compiled board gets). Writes bench/results/fp32.json. Goal: ours <= 1.3x onnxruntime.
MODELS=efficientnet_lite0,mobilenetv2,resnet18 (default), ROUNDS=7.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import machine, ort_timer, update_readme, write  # noqa: E402
from ohq_tvm.compile import Options, compile_onnx  # noqa: E402
from ohq_tvm.runtime import Model, interleaved, set_threads  # noqa: E402

MODELS = os.environ.get("MODELS", "efficientnet_lite0,mobilenetv2,resnet18").split(",")
THREADS = (1, 2)
BUILDS = {"tuned": ROOT / "tuning_logs", "rule": None}     # None: a fresh empty work dir


def _build(model: Path, work_dir: Path | None) -> tuple[Model, tuple[int, ...]]:
    with tempfile.TemporaryDirectory() as empty:
        compiled = compile_onnx(model, "llvm", work_dir=work_dir or Path(empty), threads=2, options=Options(
            uniform="FP32", baselines=False, tune_trials=int(os.environ.get("TUNE_TRIALS", "32")) if work_dir else 0))
    return Model(compiled.executable), compiled.imported.input_shape


def _timer(model: Model, x: np.ndarray, threads: int):
    def measure() -> float:
        set_threads(threads)
        return model.time_ms(x, min_seconds=0.3)
    return measure


def main() -> None:
    timers = {}
    for name in MODELS:
        path = ROOT / "models" / f"{name}.onnx"
        builds = {build: _build(path, work_dir) for build, work_dir in BUILDS.items()}
        x = np.random.default_rng(0).standard_normal(builds["tuned"][1], dtype=np.float32)
        for t in THREADS:
            timers[(name, "onnxruntime", t)] = ort_timer(path, x, t)
            for build, (model, _) in builds.items():
                timers[(name, f"ohq_tvm {build}", t)] = _timer(model, x, t)
    medians = interleaved(timers, rounds=int(os.environ.get("ROUNDS", "7")))
    rows = [{"model": name, "system": system, "threads": t, "median_ms": round(ms, 4),
             "ratio_vs_onnxruntime": round(ms / medians[(name, "onnxruntime", t)], 3)}
            for (name, system, t), ms in medians.items()]
    path = write("fp32.json", {"machine": machine(), "rows": rows, "goal": "<= 1.3x onnxruntime"})
    table = ["| model | system | threads | median ms | / onnxruntime |", "|---|---|---|---|---|"]
    table += [f"| {r['model']} | {r['system']} | {r['threads']} | {r['median_ms']:.2f} | "
              f"{r['ratio_vs_onnxruntime']:.2f}x |" for r in rows if r["system"] != "onnxruntime"]
    table += [f"| {r['model']} | onnxruntime | {r['threads']} | {r['median_ms']:.2f} | |"
              for r in rows if r["system"] == "onnxruntime"]
    markdown = "\n".join(table) + (
        f"\n\nFP32, batch 1, measured on {machine()}. `tuned`: the committed tuning records (the better of "
        "MetaSchedule's search and the fixed rule per kernel); `rule`: no records, the fixed rule alone.")
    print(markdown)
    update_readme("fp32", markdown)
    print("->", path)


if __name__ == "__main__":
    main()
