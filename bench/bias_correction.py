"""Bias correction: what it buys on EfficientNet-Lite0, measured apart from the rest of the flow.

Every conv of a kind (dense, or depthwise) gets its weights quantized as the kernels do (`kernels.quantize_weights`,
4 bits, and the 7-bit INT8 weights of AVX2), activations kept FP32, with and without the bias correction
(`kernels.bias_correction`, channel means of each conv's input on the data-free distilled inputs MQE uses).
onnxruntime runs the copies; top-1 agreement and KL against FP32 on the bench's 200 photo crops.

Writes bench/results/bias_correction.json and the README block.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import machine, update_readme, write  # noqa: E402
from ohq_tvm import data, evaluate, kernels, mqe  # noqa: E402
from ohq_tvm.frontend import load_onnx  # noqa: E402
from ohq_tvm.layers import find_layers  # noqa: E402
from ohq_tvm.target import parse_target  # noqa: E402

EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
MQE_DIR = ROOT / "tuning_logs" / parse_target("llvm").cpu_key / "mqe"
CASES = [(4, "dense"), (4, "depthwise"), (8, "dense"), (8, "depthwise")]


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def _run(model: onnx.ModelProto, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Batch-1 runs over x; the model's output, or the named intermediate values, stacked."""
    if outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outputs)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    runs = [sess.run(outputs, {name: sample[None]}) for sample in x]
    return [np.concatenate(values) for values in zip(*runs)]


def _quantized(model: onnx.ModelProto, kind: str, bits: int, means: dict[str, np.ndarray] | None) -> onnx.ModelProto:
    """`model` with every conv of `kind` at `bits`-bit weights (8: AVX2's 7-bit), its BatchNormalization mean
    moved by the correction when `means` are given (these convs have no bias: BN follows each)."""
    q = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type != "Conv" or (_group(node) > 1) != (kind == "depthwise"):
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        codes, scale = kernels.quantize_weights(w, bits, reduce_range=bits == 8)
        deq = (codes * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(deq, node.input[1]))
        if means is not None:
            shift = kernels.bias_correction(w.transpose(0, 2, 3, 1), deq.transpose(0, 2, 3, 1), means[node.name],
                                            _group(node))
            bn = next(n for n in q.graph.node if n.op_type == "BatchNormalization" and n.input[0] == node.output[0])
            mean = numpy_helper.to_array(inits[bn.input[3]])
            inits[bn.input[3]].CopyFrom(numpy_helper.from_array((mean - shift).astype(np.float32), bn.input[3]))
    return q


def main() -> None:
    model = onnx.load(str(EFFNET))
    imported = load_onnx(EFFNET)
    macs = sum(layer.macs for layer in find_layers(imported.mod))
    distilled, source = mqe.calibration_inputs(EFFNET, imported.input_shape, None, 8, 0, macs, MQE_DIR)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    inputs = _run(model, distilled, [n.input[0] for n in convs])
    means = {n.name: v.mean(axis=(0, 2, 3)) for n, v in zip(convs, inputs)}      # NCHW
    crops = data.photo_crops(200, "eval")
    [reference] = _run(model, crops)
    rows = []
    for bits, kind in CASES:
        for corrected in (False, True):
            [logits] = _run(_quantized(model, kind, bits, means if corrected else None), crops)
            a = evaluate.agreement(reference, logits)
            rows.append({"weights": f"{kind} convs at {7 if bits == 8 else bits} bits", "bias_correction": corrected,
                         "top1_agreement": round(a.top1_agreement, 4), "mean_kl": round(a.mean_kl, 4)})
            print(rows[-1], flush=True)
    path = write("bias_correction.json", {"machine": machine(), "model": EFFNET.name, "means_from": source,
                                          "crops": len(crops), "rows": rows})
    table = ["| EfficientNet-Lite0, weights quantized (activations FP32) | agreement / KL without | with correction |",
             "|---|---|---|"]
    for plain, fixed in zip(rows[::2], rows[1::2]):
        table.append(f"| {plain['weights']} | {plain['top1_agreement']:.3f} / {plain['mean_kl']:.3f} | "
                     f"{fixed['top1_agreement']:.3f} / {fixed['mean_kl']:.3f} |")
    update_readme("bias_correction", "\n".join(table) + f"\n\nChannel means from {len(distilled)} {source} inputs; "
                  f"top-1 agreement and KL against FP32 on {len(crops)} photo crops (onnxruntime).")
    print("->", path)


if __name__ == "__main__":
    main()
