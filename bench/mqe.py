"""MQE: how well each sensitivity estimator ranks (layer, candidate) pairs, and how fast it is.

Fashion-MNIST: for each estimator, the Spearman rank correlation between its scores and the real
top-1 drop on the 10,000 test images of quantizing that layer alone (weights per channel, the
layer's input with the estimator's calibration ranges), plus its wall time. The real drop is
measured independently of our simulation: onnxruntime on a copy of the ONNX model whose layer has
fake-quantized weights and a Mul/Round/Add/Max/Min/Sub/Mul quantizer on its input.
EfficientNet-Lite0: wall time of MQE over all layers x candidates (warm logs; cold tuning separate), and
how its scores rank the layers: each layer alone at W4A8, MQE's score against the KL on 60 photo crops
(same simulation, same ranges), for its inputs (distilled) and for 1/f noise inputs.

Writes bench/results/mqe.json. Goal: Spearman(MQE) >= 0.8; EfficientNet-Lite0 MQE <= 60 s on 2 cores.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")
import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import helper, numpy_helper  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.timing import machine, update_readme, write  # noqa: E402
from ohq_tvm import data, kernels, mqe  # noqa: E402
from ohq_tvm.cli import quiet_tvm_logs  # noqa: E402
from ohq_tvm.evaluate import kl_divergence  # noqa: E402
from ohq_tvm.data import fashion_mnist_test  # noqa: E402
from ohq_tvm.frontend import load_onnx  # noqa: E402
from ohq_tvm.layers import find_layers  # noqa: E402
from ohq_tvm.measure import candidates_for_bits  # noqa: E402
from ohq_tvm.target import parse_target  # noqa: E402

FMNIST = ROOT / "ohq_tvm" / "assets" / "fmnist_resnet.onnx"
EFFNET = ROOT / "models" / "efficientnet_lite0.onnx"
WORK_DIR = ROOT / "tuning_logs"
ESTIMATORS = ("mqe", "weight-error", "output-mse")
CONFIGS = candidates_for_bits([8, 4, 2, 1])


def _quantized_onnx(model: onnx.ModelProto, node_index: int, layer, config, act_range, input_mean,
                    reduce_range) -> bytes:
    """A copy of `model` (batch dimension freed) with layer `node_index` quantized as its kernel would be:
    weights, input quantizer and bias correction."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for value in (*m.graph.input, *m.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    del m.graph.value_info[:]
    node = m.graph.node[node_index]
    init = next(t for t in m.graph.initializer if t.name == node.input[1])
    w = numpy_helper.to_array(init)
    transposed = node.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in node.attribute)
    oihw = w.T if transposed else w          # output channels first
    codes, scale = kernels.quantize_weights(oihw, config.wbits,
                                            reduce_range and kernels.family(layer, config) == "dot")
    deq = (codes.astype(np.float32) * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32)
    init.CopyFrom(numpy_helper.from_array(deq.T if transposed else deq, init.name))
    ohwi = (lambda a: a.transpose(0, 2, 3, 1)) if w.ndim == 4 else (lambda a: a[:, None, None, :])  # noqa: E731
    shift = kernels.bias_correction(ohwi(oihw), ohwi(deq), input_mean, layer.groups)
    act = kernels.ActQuant.from_range(*act_range, config.abits)
    consts = {"inv": act.inv_scale, "zp": act.zero_point, "qmax": 2 ** config.abits - 1, "zero": 0.0,
              "scale": act.scale}
    p = f"fq{node_index}_"
    m.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), p + k) for k, v in consts.items())
    m.graph.initializer.append(numpy_helper.from_array(shift.reshape(-1, *[1] * (w.ndim - 2)), p + "shift"))
    result = node.output[0]
    node.output[0] = p + "out"
    m.graph.node.insert(node_index + 1, helper.make_node("Add", [p + "out", p + "shift"], [result]))
    x = node.input[0]
    chain = [("Mul", [x, p + "inv"]), ("Round", [None]), ("Add", [None, p + "zp"]), ("Max", [None, p + "zero"]),
             ("Min", [None, p + "qmax"]), ("Sub", [None, p + "zp"]), ("Mul", [None, p + "scale"])]
    nodes, prev = [], x
    for i, (op, inputs) in enumerate(chain):
        out = f"{p}{i}"
        nodes.append(helper.make_node(op, [prev if v is None else v for v in inputs], [out]))
        prev = out
    node.input[0] = prev
    for offset, new in enumerate(nodes):
        m.graph.node.insert(node_index + offset, new)
    return m.SerializeToString()


def true_drops(calibration: mqe.Calibration, layers, reduce_range: bool) -> tuple[dict, float, float]:
    """Real top-1 drop on the Fashion-MNIST test set of quantizing each layer alone (onnxruntime)."""
    import onnxruntime as ort
    x, y = fashion_mnist_test()
    model = onnx.load(str(FMNIST))
    anchors = [i for i, n in enumerate(model.graph.node) if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(anchors) == len(layers), "ONNX layers and Relax layers differ"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2

    def top1(blob) -> float:
        sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        return float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(-1) == y).mean())

    t0 = time.perf_counter()
    free = onnx.ModelProto.FromString(model.SerializeToString())
    for value in (*free.graph.input, *free.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "N"
    fp32 = top1(free.SerializeToString())
    drops = {}
    for layer, index in zip(layers, anchors):
        assert int(np.prod(numpy_helper.to_array(next(
            t for t in model.graph.initializer if t.name == model.graph.node[index].input[1])).shape)) \
            == layer.weight_count
        drops[layer.id] = {}
        for config in mqe.available(layer, CONFIGS):
            # the anchors shift by 7 per inserted quantizer: each copy has only its own
            blob = _quantized_onnx(model, index, layer, config, calibration.ranges[layer.id],
                                   calibration.means[layer.id], reduce_range)
            drops[layer.id][config.name] = fp32 - top1(blob)
    return drops, fp32, time.perf_counter() - t0


def fmnist_bench(target) -> dict:
    imported = load_onnx(FMNIST)
    layers = find_layers(imported.mod)
    sim = mqe.Simulation(imported, layers, target, WORK_DIR, tune_trials=16)
    results = {m: mqe.estimate(FMNIST, imported, layers, CONFIGS, target, method=m, simulation=sim)
               for m in ESTIMATORS}
    calibration = results["mqe"].calibration
    drops, fp32, truth_seconds = true_drops(calibration, layers, kernels.isa_of(target.tvm).reduce_range)
    pairs = [(lid, c) for lid, row in drops.items() for c in row]
    truth = [drops[lid][c] for lid, c in pairs]
    estimators = {}
    for method, result in results.items():
        scores = [result.scores[lid][c] for lid, c in pairs]
        estimators[method] = {"spearman": round(float(spearmanr(scores, truth).statistic), 4),
                              "seconds": round(result.seconds, 2),
                              "stages": {k: round(v, 2) for k, v in result.stages.items()},
                              "scores": result.scores}
    return {"model": "fmnist_resnet", "pairs": len(pairs), "fp32_top1": fp32, "test_images": 10000,
            "calibration": {"source": calibration.source, "ranges": calibration.ranges,
                            "clip_percentile": mqe.CLIP_PERCENTILE},
            "simulation_build_seconds": round(sim.build_seconds, 1), "tuned_tasks": sim.tune_stats.tuned,
            "true_drop": drops, "true_drop_seconds": round(truth_seconds, 1), "estimators": estimators}


def crops_ranking(sim, layers, x: np.ndarray, reduce_range: bool, config: str = "W4A8") -> dict:
    """Each layer alone at `config`: KL on `x` (ranges from `x`) against the KL on 60 photo crops."""
    crops = data.photo_crops(200, "eval")[:60]
    ref_x, inputs = sim.run(x)
    calibration = mqe.Calibration(mqe.ranges_of(layers, inputs), "given", mqe.means_of(layers, inputs))
    ref_c = sim.run(crops)[0]
    cfg = kernels.parse_config(config)
    est, real = [], []
    for layer in layers:
        if cfg in mqe.available(layer, [cfg]):
            mask = mqe.quantization_mask(sim, layers, {layer.id: cfg}, calibration, reduce_range)
            est.append(float(kl_divergence(ref_x, sim.logits(x, *mask)).mean()))
            real.append(float(kl_divergence(ref_c, sim.logits(crops, *mask)).mean()))
    ratio = np.log(np.array(est) / np.array(real))
    return {"config": config, "layers": len(est), "spearman": round(float(spearmanr(est, real).statistic), 3),
            "log_ratio_std": round(float(ratio.std()), 3), "estimated": est, "crops": real}


def effnet_bench(target) -> dict:
    imported = load_onnx(EFFNET)
    layers = find_layers(imported.mod)
    sim = mqe.Simulation(imported, layers, target, WORK_DIR, tune_trials=16)
    result = mqe.estimate(EFFNET, imported, layers, CONFIGS, target, simulation=sim)
    evaluations = sum(len(row) - 1 for row in result.scores.values())
    reduce_range = kernels.isa_of(target.tvm).reduce_range
    ranking = {result.calibration.source: crops_ranking(sim, layers, result.inputs, reduce_range),
               "noise": crops_ranking(sim, layers, mqe.noise_inputs(imported.input_shape, 8), reduce_range)}
    return {"model": "efficientnet_lite0", "layers": len(layers), "evaluations": evaluations,
            "samples": 8, "source": result.calibration.source, "mqe_seconds": round(result.seconds, 2),
            "stages": {k: round(v, 2) for k, v in result.stages.items()},
            "simulation_build_seconds": round(sim.build_seconds, 1), "tasks": sim.tune_stats.tasks,
            "tuned_now": sim.tune_stats.tuned,
            "total_seconds": round(result.seconds + sim.build_seconds, 1), "ranking_vs_crops": ranking,
            "note": "total_seconds = mqe_seconds (inputs, ranges, scores) + simulation_build_seconds (tuning of "
                    "missing tasks + compile; warm logs: compile only)"}


def main() -> None:
    quiet_tvm_logs()
    target = parse_target("llvm", threads=2)
    payload = {"machine": machine(), "threads": 2, "fmnist": fmnist_bench(target)}
    if "--no-effnet" not in sys.argv:
        payload["efficientnet_lite0"] = effnet_bench(target)
    print(write("mqe.json", payload))
    for method, row in payload["fmnist"]["estimators"].items():
        print(f"{method:>13}: spearman {row['spearman']:+.3f}  {row['seconds']:.1f} s")
    fm = payload["fmnist"]
    lines = [f"Fashion-MNIST, {fm['pairs']} (layer, candidate) pairs, Spearman vs the true top-1 drop: "
             + ", ".join(f"**{m}** {row['spearman']:.3f} ({row['seconds']:.1f} s)" for m, row in fm["estimators"].items())
             + " (goal for mqe: >= 0.8)."]
    if "efficientnet_lite0" in payload:
        e = payload["efficientnet_lite0"]
        print(f"EfficientNet-Lite0 MQE: {e['total_seconds']:.1f} s ({e['mqe_seconds']:.1f} s + "
              f"{e['simulation_build_seconds']:.1f} s simulation build)")
        lines.append(f"EfficientNet-Lite0, all {e['layers']} layers x {e['evaluations']} (layer, candidate) pairs, "
                     f"{e['samples']} {e['source']} samples: **{e['total_seconds']:.1f} s** (goal <= 60 s) = "
                     f"{e['simulation_build_seconds']:.1f} s simulation build + {e['mqe_seconds']:.1f} s inputs, "
                     "ranges and scores. Each layer alone at W4A8, score against the KL on 60 photo crops: "
                     + ", ".join(f"{src} inputs Spearman {r['spearman']:.2f}, log-ratio std {r['log_ratio_std']:.2f}"
                                 for src, r in e["ranking_vs_crops"].items()) + ".")
    update_readme("mqe", "\n\n".join(lines) + f"\n\nMeasured on {machine()}, 2 threads.")


if __name__ == "__main__":
    main()
