"""Integer kernels vs onnxruntime FP32 / INT8 (QLinearConv, QLinearMatMul) on the same shapes.

Writes bench/results/kernels.json: rows {"workload", "config", "impl": "tvm"|"ort", "threads", "median_ms"}.
Like onnxruntime's INT8 operators, our kernels take u8 activation codes and give the next layer's u8 codes
(epilogue and requantization included): the form of a layer between two quantized layers in a network.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import machine, ort_timer, update_readme, write  # noqa: E402
from ohq_tvm import kernels  # noqa: E402
from ohq_tvm.layers import Layer  # noqa: E402
from ohq_tvm.measure import Measurer, TuningLog, build_kernel, kernel_args, search, time_module  # noqa: E402
from ohq_tvm.runtime import interleaved, set_threads  # noqa: E402
from ohq_tvm.target import parse_target  # noqa: E402


def conv(c, h, o, k, stride=1, groups=1) -> Layer:
    pad = k // 2
    oh = (h + 2 * pad - k) // stride + 1
    kind = "conv" if groups == 1 else "depthwise"
    return Layer("conv2d0", "conv2d", kind, (1, h, h, c), (o, k, k, c // groups), (1, oh, oh, o),
                 (stride, stride), (pad,) * 4, (1, 1), groups, codes_in=True, codes_out=True)


def dense(m, k, n) -> Layer:
    return Layer("matmul0", "matmul", "dense", (m, k), (k, n), (m, n), codes_in=True, codes_out=True)


WORKLOADS = {
    "conv 1x64x56x56 3x3 ->64": conv(64, 56, 64, 3),
    "conv 1x256x14x14 3x3 ->256": conv(256, 14, 256, 3),
    "conv 1x96x28x28 1x1 ->192": conv(96, 28, 192, 1),
    "depthwise 1x144x56x56 3x3 (EfficientNet-Lite0)": conv(144, 56, 144, 3, groups=144),
    "dense 1x4096x4096": dense(1, 4096, 4096),
    "dense 16x4096x4096": dense(16, 4096, 4096),
}
CONFIGS = ["W8A8", "W4A8", "W2A8", "W4A4", "W2A2", "W1A2", "W1A1"]
THREADS = (1, 2)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def ort_models(layer: Layer, rng) -> dict[str, tuple[onnx.ModelProto, np.ndarray]]:
    """FP32 and INT8 (QLinear*) single-operator models of `layer`, with an input for each."""
    if layer.op == "conv2d":
        n, h, w, c = layer.input_shape
        o, k, _, cg = layer.weight_shape
        attrs = dict(strides=list(layer.strides), pads=[layer.padding[0], layer.padding[1], layer.padding[2],
                     layer.padding[3]], group=layer.groups)
        x_shape, w_shape = [n, c, h, w], [o, cg, k, k]
        y_shape = [n, o, layer.output_shape[1], layer.output_shape[2]]
        fp32 = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
        int8 = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], **attrs)
        w_scale, w_zp = np.full(o, 0.01, np.float32), np.zeros(o, np.int8)
    else:
        x_shape, w_shape, y_shape = list(layer.input_shape), list(layer.weight_shape), list(layer.output_shape)
        fp32 = helper.make_node("MatMul", ["x", "w"], ["y"])
        int8 = helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
        w_scale, w_zp = np.float32(0.01), np.int8(0)
    models = {}
    for name, node, xt, wt in (("FP32", fp32, TensorProto.FLOAT, np.float32), ("INT8", int8, TensorProto.UINT8, np.int8)):
        weight = (rng.standard_normal(w_shape) * (1 if wt == np.float32 else 40)).astype(wt)
        inits = [_const("w", weight)]
        if name == "INT8":
            inits += [_const("xs", np.float32(0.02)), _const("xz", np.uint8(128)), _const("ws", w_scale),
                      _const("wz", w_zp), _const("ys", np.float32(0.05)), _const("yz", np.uint8(128))]
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", xt, x_shape)],
                                  [helper.make_tensor_value_info("y", xt, y_shape)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        x = rng.standard_normal(x_shape).astype(np.float32) if name == "FP32" else \
            rng.integers(0, 256, x_shape).astype(np.uint8)
        models[name] = (model, x)
    return models


def threaded_timer(lib, args, threads: int):
    def measure() -> float:
        set_threads(threads)
        return time_module(lib, args)
    return measure


def main() -> None:
    target = parse_target("llvm", max(THREADS))
    measurer = Measurer(target)
    log = TuningLog(ROOT / "tuning_logs" / target.key / "oqa.jsonl", target)
    rng = np.random.default_rng(0)
    rows, chosen = [], {}
    rounds = int(os.environ.get("ROUNDS", "5"))
    only = os.environ.get("WORKLOADS")
    for wname, layer in WORKLOADS.items():
        if only and only not in wname:
            continue
        timers = {}
        for cname in CONFIGS:
            config = kernels.parse_config(cname)
            if kernels.family(layer, config) is None:      # e.g. bit-serial depthwise: no such kernel
                continue
            best = search(layer, config, measurer, log)        # knob search through the local runner
            if best.knobs is None:
                continue
            knobs = kernels.Knobs(*best.knobs)
            chosen[f"{wname} {cname}"] = best.knobs
            lib, args = build_kernel(layer, config, knobs, target.tvm), kernel_args(layer, config, knobs, target.tvm)
            for t in THREADS:
                timers[("tvm", cname, t)] = threaded_timer(lib, args, t)
        for name, (model, x) in ort_models(layer, rng).items():
            path = ROOT / "build" / "bench_kernels" / f"{name}.onnx"
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(model, path)
            for t in THREADS:
                timers[("ort", name, t)] = ort_timer(path, x, t, min_seconds=0.2)
        medians = interleaved(timers, rounds)
        for (impl, cname, t), ms in medians.items():
            rows.append({"workload": wname, "config": cname, "impl": impl, "threads": t, "median_ms": round(ms, 4)})
        print(wname, {f"{i}/{c}/{t}": round(m, 3) for (i, c, t), m in medians.items()}, flush=True)
    write("kernels.json", {"machine": machine(), "target": target.key, "isa": kernels.isa_of(target.tvm).name,
                           "rows": rows, "knobs": chosen})
    update_readme("kernels", markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = []
    for t in THREADS:
        sub = [r for r in rows if r["threads"] == t]
        workloads = list(dict.fromkeys(r["workload"] for r in sub))
        cols = ["ort FP32", "ort INT8"] + [f"tvm {c}" for c in CONFIGS]
        lines += [f"**{t} thread{'s' if t > 1 else ''}** (median ms; in brackets: / our W8A8)", "",
                  "| workload | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for wl in workloads:
            ms = {f"{r['impl']} {r['config']}": r["median_ms"] for r in sub if r["workload"] == wl}
            base = ms.get("tvm W8A8")
            cells = [(f"{ms[c]:.3f}" + (f" ({ms[c] / base:.2f})" if base and c.startswith("tvm") else ""))
                     if c in ms else "-" for c in cols]
            lines.append(f"| {wl} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + f"\nMeasured on {machine()}."


if __name__ == "__main__":
    main()
