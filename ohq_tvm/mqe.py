"""MQE: data-free sensitivity of every quantizable layer at every bit-width candidate.

1. Synthetic inputs. If the ONNX model still carries BatchNormalization nodes, inputs are distilled
   (ZeroQ): starting from noise, Adam descends sum_k |mean_k - mu_k|^2 + |std_k - sigma_k|^2 over the
   per-channel batch statistics of every BN input, gradients from `relax.transform.Gradient`.
   Otherwise: noise with natural images' statistics (1/f amplitude spectrum, channels mostly one
   shared luminance field) and the mean and spread of the model's input range.
   `calibration_data` (a folder of images, an .npy/.npz array) replaces both.
2. Ranges. The range of each layer's input activation is its [0.001, 99.999] percentile over all
   values of the calibration batch (min and max clipped at those percentiles; 0 stays inside, see
   `ActQuant.from_range`); a layer fed only by another's clamp (ReLU6) takes the clamp's range: real
   inputs fill it where synthetic ones fall short deep in the network. Weights are quantized per
   output channel exactly as the kernels do.
3. The mask. One compiled fake-quant simulation of the network: every quantizable layer's weight is
   a runtime parameter (FP32, or its quantized-dequantized copy) and its input passes through
   x + e * (dequant(quant(x)) - x) with (1/scale, zero point, qmax, e, scale) a row of a runtime
   matrix. Every layer x candidate evaluation reuses this one MetaSchedule-scheduled build, and starts from
   the segment of its layer (`MaskedModule`): the layers before it compute what they did in FP32.
   s(layer, candidate) = mean over the batch of KL(softmax FP32 logits || softmax masked logits).

Estimators (`--sensitivity`): mqe (above); weight-error (Hessian-free HAWQ: relative squared
quantization error of the weights plus that of the layer's calibration input, no network run);
output-mse (mean squared error of the masked logits, same runs as mqe); accuracy (top-1 drop on
labelled data, same simulation).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import build, kernels, tune
from .errors import OhqError
from .evaluate import kl_divergence
from .frontend import Imported, clamp_to_ops, numpy_fold
from .kernels import ActQuant, Config, parse_config, quantize_weights
from .layers import QUANTIZABLE, Layer, copy_module
from .target import Target, parse_target

METHODS = ("mqe", "weight-error", "output-mse", "accuracy")
REVISION = 5    # of the estimator: bump it when a change alters the scores, so cached results are recomputed
CLIP_PERCENTILE = 0.001         # activation ranges: [p, 100 - p] percentiles of the layer input
# Distillation differentiates the model with a gradient module scheduled by tune's fixed rule (5.8 -> 0.6 s
# per Adam step on 8 samples of EfficientNet-Lite0, 385 M MACs each, 2 Zen3 cores). Models over
# DISTILL_LARGE_MACS per sample get DISTILL_LARGE_STEPS instead of 200 (EfficientNet-Lite0, each layer alone
# at W4A8, MQE vs KL on 60 photo crops, Spearman after 10, 20, 30, 50, 200 steps: 0.93, 0.93, 0.92, 0.90, 0.92;
# 0.78 on noise); beyond DISTILL_MAX_MACS (a ResNet-18: ~4 min, estimated), noise inputs instead. 40 rather
# than 20 for the ranges and the bias correction's channel means (EfficientNet-Lite0's 0.9-budget mix through
# the simulation on 200 photo crops, KL 0.44 -> 0.34; with the input range given 0.35 -> 0.28).
DISTILL_LARGE_MACS = 50_000_000
DISTILL_LARGE_STEPS = 40
DISTILL_MAX_MACS = 500_000_000


@dataclass(frozen=True)
class Calibration:
    ranges: dict[str, tuple[float, float]]   # layer id -> (lo, hi) of the layer's input activation, clipped
    source: str                              # "distilled" | "noise" | "data"
    means: dict[str, tuple[float, ...]] = field(default_factory=dict)   # layer id -> mean of each input channel


@dataclass
class Sensitivity:
    method: str
    scores: dict[str, dict[str, float]]      # layer id -> candidate name -> score; FP32 0; no kernel: absent
    calibration: Calibration
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)   # inputs, build, ranges, scores (s)
    inputs: np.ndarray | None = None         # the inputs scored on (not in the JSON)
    simulation: Simulation | None = None     # the simulation scored with (not in the JSON)

    def to_json(self) -> dict:
        return {"method": self.method, "source": self.calibration.source, "seconds": round(self.seconds, 3),
                "stages": {k: round(v, 3) for k, v in self.stages.items()},
                "ranges": {k: list(v) for k, v in self.calibration.ranges.items()},
                "means": {k: list(v) for k, v in self.calibration.means.items()}, "scores": self.scores}


    @classmethod
    def from_json(cls, d: dict) -> "Sensitivity":
        ranges = {k: (float(lo), float(hi)) for k, (lo, hi) in d["ranges"].items()}
        means = {k: tuple(float(m) for m in v) for k, v in d["means"].items()}
        return cls(d["method"], d["scores"], Calibration(ranges, d["source"], means), d["seconds"], d.get("stages", {}))


def _model_hash(model: str | Path, params: tuple):
    """sha256 of a model's bytes and the parameters a cached result of it depends on."""
    import hashlib
    h = hashlib.sha256(Path(model).read_bytes())
    h.update(repr(params).encode())
    return h


def cache_key(model: str | Path, configs: list[Config], method: str, samples: int, seed: int,
              calibration_data: str | Path | None, reduce_range: bool,
              input_range: tuple[float, float] | None = None) -> str:
    """Everything a Sensitivity depends on: the model's bytes, the candidates, the estimator and its inputs."""
    h = _model_hash(model, (sorted(c.name for c in configs), method, samples, seed, reduce_range, CLIP_PERCENTILE))
    if REVISION > 1:      # revision-1 caches (from before the field) keep their keys
        h.update(f"revision {REVISION}".encode())
    if input_range is not None and calibration_data is None:
        h.update(f"input range {tuple(map(float, input_range))}".encode())
    if calibration_data is not None:
        path = Path(calibration_data)
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Synthetic and user calibration inputs

def noise_inputs(shape: tuple[int, ...], samples: int, seed: int = 0,
                 input_range: tuple[float, float] | None = None) -> np.ndarray:
    """Noise centred in `input_range` (default -1..1), std a quarter of its width, clipped to it. Images (NCHW) get natural
    images' statistics: a 1/f amplitude spectrum (edges at every scale) and channels that are mostly one
    shared luminance field, chroma 0.3 of it."""
    rng = np.random.default_rng(seed)
    lo, hi = input_range or (-1.0, 1.0)
    if len(shape) == 4:
        n, c, h, w = samples, *shape[1:]
        f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
        f[0, 0] = 1.0 / max(h, w)

        def field(count: int) -> np.ndarray:
            spectrum = (rng.standard_normal((count, *f.shape)) + 1j * rng.standard_normal((count, *f.shape))) / f
            x = np.fft.irfft2(spectrum, s=(h, w))
            return (x - x.mean((1, 2), keepdims=True)) / (x.std((1, 2), keepdims=True) + 1e-8)
        x = field(n)[:, None] + 0.3 * field(n * c).reshape(n, c, h, w)
    else:
        x = rng.standard_normal((samples, *shape[1:]))
    x /= x.std(axis=tuple(range(1, x.ndim)), keepdims=True) + 1e-8
    return np.clip((lo + hi) / 2 + x * (hi - lo) / 4, lo, hi).astype(np.float32)


def load_calibration_data(source: str | Path | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """An array [N, *shape[1:]], an .npy/.npz file (key x) or a folder of images -> float32 [N, *shape[1:]]."""
    if isinstance(source, np.ndarray):
        x = source
    else:
        path = Path(source)
        if path.is_dir():
            x = _images(path, shape)
        elif path.suffix == ".npy" and path.is_file():
            x = np.load(path)
        elif path.suffix == ".npz" and path.is_file():
            with np.load(path) as archive:
                x = archive["x"] if "x" in archive else archive[archive.files[0]]
        else:
            raise OhqError(f"--calibration-data {path}: expected a folder of images, an .npy or an .npz file")
    x = np.asarray(x, np.float32)
    if x.shape[1:] != tuple(shape[1:]) and x.size % int(np.prod(shape[1:])) == 0 and x.ndim == len(shape) - 1:
        x = x.reshape(-1, *shape[1:])     # e.g. [N, 28, 28] for a [1, 1, 28, 28] input
    if x.ndim != len(shape) or x.shape[1:] != tuple(shape[1:]) or len(x) == 0:
        raise OhqError(f"calibration data of shape {list(x.shape)} does not fit the model input {list(shape)}")
    return np.ascontiguousarray(x)


def _images(folder: Path, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image
    from .data import imagenet_preprocess
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not files:
        raise OhqError(f"--calibration-data {folder}: no .png/.jpg images in the folder")
    if len(shape) != 4 or shape[1] != 3 or shape[2] != shape[3]:
        raise OhqError(f"--calibration-data {folder}: image folders need a square RGB input, not {list(shape)}")
    return np.stack([imagenet_preprocess(np.asarray(Image.open(p).convert("RGB")), shape[2]) for p in files])


def bn_statistics(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(BN input tensor, running mean, running std) of every BatchNormalization node of the ONNX graph."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    stats = []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization" or not all(n in inits for n in node.input[3:5]):
            continue
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        stats.append((node.input[0], inits[node.input[3]].astype(np.float32),
                      np.sqrt(inits[node.input[4]].astype(np.float32) + eps)))
    return stats


def distill(model_path: str | Path, shape: tuple[int, ...], samples: int, seed: int = 0, steps: int = 200,
            lr: float = 0.1, cache_dir: Path | None = None, input_range: tuple[float, float] | None = None
            ) -> np.ndarray:
    """ZeroQ: inputs whose per-channel batch statistics at every BN input match the BN's running ones.
    `input_range`: the model input's known bounds (e.g. an image preprocessing's -1, 1): the inputs start as
    `noise_inputs` in it and stay in it (projected after each step); else they start as N(0, 1), unbounded.
    `cache_dir` keeps them (minutes for large models), keyed by the model's bytes and the arguments."""
    if cache_dir is not None:
        key = (tuple(shape[1:]), samples, seed, steps, lr, REVISION) + ((tuple(input_range),) if input_range else ())
        cached = Path(cache_dir) / f"distilled-{_model_hash(model_path, key).hexdigest()[:20]}.npy"
        if cached.is_file():
            return np.load(cached)
        x = distill(model_path, shape, samples, seed, steps, lr, input_range=input_range)
        cached.parent.mkdir(parents=True, exist_ok=True)
        build.atomic_write(cached, lambda path: np.save(path, x))
        return x
    model = onnx.load(str(model_path))
    stats = bn_statistics(model)
    if not stats:
        raise OhqError(f"{model_path}: no BatchNormalization statistics to distill inputs from")
    step = _distill_step(model, stats, (samples, *shape[1:]))
    if input_range:
        x = noise_inputs(shape, samples, seed, input_range)
    else:
        x = np.random.default_rng(seed).standard_normal((samples, *shape[1:])).astype(np.float32)
    m, v = np.zeros_like(x), np.zeros_like(x)
    for t in range(1, steps + 1):       # Adam
        _, grad = step(x)
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        x -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        if input_range:
            np.clip(x, *input_range, out=x)
    return x.astype(np.float32)


def _upstream_of(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` computing only `outputs`: the classifier head (often a Reshape traced at batch 1)
    is not imported."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    needed, kept = set(outputs), []
    for node in reversed(model.graph.node):
        if needed & set(node.output):
            kept.append(node)
            needed |= set(node.input)
    del model.graph.node[:], model.graph.output[:]
    model.graph.node.extend(reversed(kept))
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs)
    unused = [t for t in model.graph.initializer if t.name not in needed]
    for t in unused:
        model.graph.initializer.remove(t)
    return model


def _distill_step(model: onnx.ModelProto, stats, shape: tuple[int, ...]):
    """Compiled (loss, d loss / d x) of the BN-statistics loss on an NCHW import (Gradient needs NCHW)."""
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.training.utils import AppendLoss
    model = _upstream_of(model, [name for name, *_ in stats])
    inp = next(i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(model, shape_dict={inp.name: list(shape)}, keep_params_in_input=True)
    mod, params = relax.frontend.detach_params(mod)
    names = [v.name for v in mod["main"].params[1:]]
    mod = relax.transform.BindParams("main", dict(zip(names, params.get("main", []))))(mod)
    mod = tvm.transform.Sequential([numpy_fold, relax.transform.FoldConstant(),
                                    clamp_to_ops,       # Clip: no gradient as call_tir
                                    relax.transform.DecomposeOpsForInference(), numpy_fold,
                                    relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()])(mod)
    ret_ty = mod["main"].ret_ty
    bb = relax.BlockBuilder()
    outs = relax.Var("bn_inputs", ret_ty)
    with bb.function("loss", [outs]):
        with bb.dataflow():
            total = None
            for i, (_, mean, std) in enumerate(stats):
                y = bb.emit(relax.TupleGetItem(outs, i)) if len(stats) > 1 else outs    # one output: no tuple
                mu = relax.op.mean(y, axis=[0, 2, 3])
                var = relax.op.subtract(relax.op.mean(relax.op.multiply(y, y), axis=[0, 2, 3]),
                                        relax.op.multiply(mu, mu))
                sd = relax.op.sqrt(relax.op.add(relax.op.nn.relu(var), relax.const(1e-6)))
                # relative to the running std, so wide and narrow layers weigh alike
                dm = relax.op.divide(relax.op.subtract(mu, relax.const(mean)), relax.const(std))
                ds = relax.op.divide(relax.op.subtract(sd, relax.const(std)), relax.const(std))
                term = relax.op.add(relax.op.mean(relax.op.multiply(dm, dm)), relax.op.mean(relax.op.multiply(ds, ds)))
                total = term if total is None else relax.op.add(total, term)
            out = bb.emit_output(total)
        bb.emit_func_output(out)
    mod = AppendLoss("main", bb.get()["loss"])(mod)
    # the loss reads main's tuple field by field: bound to the fields themselves, the tuple's adjoint (one zero
    # tensor per BN input, added to each step) is not built
    mod = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))
    mod = relax.transform.Gradient("main_loss", require_grads=mod["main_loss"].params[0])(mod)
    mod = numpy_fold(mod)       # the loss's constant adjoints (FoldConstant compiles each one: 7 s)
    host = parse_target("llvm")     # batch-size gradient kernels: a fixed rule, not a search (no records)
    with host.tvm:      # the rule sizes its register tiles for the current target
        scheduled = tune.ScheduleUntuned(tune.fuse(mod, host))
    vm = relax.VirtualMachine(build.compile_module(scheduled, host), tvm.cpu())
    adjoint = vm["main_loss_adjoint"]

    def step(x: np.ndarray) -> tuple[float, np.ndarray]:
        loss, (grad,) = adjoint(tvm.runtime.tensor(x))
        return float(loss.numpy()), grad.numpy()
    return step


# ---------------------------------------------------------------------------------------------
# The masked fake-quant simulation

ACT_COLUMNS = 5   # inv_scale, zero point, qmax, enabled, scale


@mutator
class _Masker(PyExprMutator):
    """conv2d/matmul(x, W const) -> conv2d/matmul(fake_quant(x, aq[i]), w_i param), and a constant per-channel
    bias added to its result -> b_i param (the bias correction changes it; a layer without one is simulated
    uncorrected, while its kernel adds the correction to a zero bias); collects layer inputs."""

    def __init__(self, mod: tvm.IRModule, ids: list[str], aq: relax.Var) -> None:
        super().__init__(mod)
        self.ids, self.aq = ids, aq
        self.counts = {"conv2d": 0, "matmul": 0}
        self.weights: dict[str, relax.Var] = {}
        self.constants: dict[str, np.ndarray] = {}
        self.biases: dict[str, relax.Var] = {}
        self.bias_constants: dict[str, np.ndarray] = {}
        self.inputs: dict[str, relax.Expr] = {}

    def _bias_of(self, call: relax.Call) -> str | None:
        """The layer whose result `call` adds a per-output-channel constant to, if it is one."""
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.add" and isinstance(call.args[0], relax.Var)
                and isinstance(call.args[1], tvm.ir.expr.GenericConst)):
            return None
        producer = self.lookup_binding(call.args[0])
        if not (isinstance(producer, relax.Call) and len(producer.args) > 1):
            return None
        lid = next((lid for lid, w in self.weights.items() if producer.args[1].same_as(w)), None)
        if lid is None or lid in self.biases:
            return None
        bias, weight = call.args[1].value.numpy(), self.constants[lid]
        channels = weight.shape[1] if weight.ndim == 2 else weight.shape[0]    # matmul [K, N], conv OHWI
        return lid if bias.size == channels and bias.shape[-1] == channels else None

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        lid = self._bias_of(call)
        if lid is not None:
            self.bias_constants[lid] = call.args[1].value.numpy()
            self.biases[lid] = relax.Var(f"b_{lid}", call.args[1].ty)
            return relax.Call(call.op, [call.args[0], self.biases[lid]], call.attrs)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in QUANTIZABLE
                and isinstance(call.args[1], tvm.ir.expr.GenericConst)):
            return call
        op = call.op.name.split(".")[-1]
        lid = f"{op}{self.counts[op]}"     # numbered exactly as layers.find_layers numbers them
        self.counts[op] += 1
        if lid not in self.ids:
            return call
        index = self.ids.index(lid)
        x = call.args[0]
        self.inputs[lid] = x
        self.constants[lid] = call.args[1].value.numpy()
        self.weights[lid] = relax.Var(f"w_{lid}", call.args[1].ty)
        row = [self.builder_.emit(relax.op.strided_slice(self.aq, [0, 1], [index, j], [index + 1, j + 1]))
               for j in range(ACT_COLUMNS)]
        return relax.Call(call.op, [self.builder_.emit(_fake_quant(x, *row)), self.weights[lid]], call.attrs)


def _fake_quant(x, inv_scale, zero_point, qmax, enabled, scale) -> relax.Expr:
    """x + e * ((clip(round(x * inv_scale) + z, 0, qmax) - z) * scale - x): the kernels' input quantizer."""
    op = relax.op
    q = op.maximum(op.minimum(op.add(op.round(op.multiply(x, inv_scale)), zero_point), qmax), relax.const(0.0))
    return op.add(x, op.multiply(enabled, op.subtract(op.multiply(op.subtract(q, zero_point), scale), x)))


@dataclass
class MaskedModule:
    """The masked network as a chain of functions seg0 .. seg{K}: seg_k(h, aq [L, 5], weights of its layers)
    -> (h of the next segment, (inputs of its layers)); seg0 takes the model input, the last returns the logits.
    The chain is cut at layer inputs after which nothing else is live (between blocks), so it computes
    exactly the network, and a run that quantizes only later layers can start from a later segment."""
    mod: tvm.IRModule
    fp32_weights: dict[str, np.ndarray]     # layer id -> the graph's weight constant
    segment_of: list[int]                   # per layer: the segment that quantizes and runs it
    fp32_biases: dict[str, np.ndarray]      # layer id -> the constant added to its result, if it has one

    @property
    def segments(self) -> int:
        return max(self.segment_of, default=0) + 1


def masked_module(mod: tvm.IRModule, layers: list[Layer]) -> MaskedModule:
    ids = [layer.id for layer in layers]
    aq = relax.Var("aq", relax.TensorType((len(ids), ACT_COLUMNS), "float32"))
    masker = _Masker(copy_module(mod), ids, aq)
    main = masker.visit_expr(mod["main"])
    missing = [i for i in ids if i not in masker.weights]
    if missing:
        raise OhqError(f"layers {', '.join(missing)} not found in the module")
    *blocks, last = main.body.blocks
    bindings = list(last.bindings)
    reads = [relax.analysis.free_vars(binding.value) for binding in bindings]
    cuts = _cuts(bindings, reads, main.body.body, set(masker.inputs.values())) if not blocks else []
    bounds = [0, *(c + 1 for c in cuts), len(bindings)]
    first_use = {}
    for j, used in enumerate(reads):
        for v in used:
            first_use.setdefault(v, j)
    segment_of = [int(np.searchsorted(bounds, first_use[masker.weights[i]], side="right")) - 1 for i in ids]
    new = tvm.IRModule({gv: f for gv, f in masker.builder_.get().functions.items() if gv.name_hint != "main"})
    for k, (begin, end) in enumerate(zip(bounds, bounds[1:])):
        own = [i for i, s in zip(ids, segment_of) if s == k]
        body = bindings[begin:end]
        if k == 0:
            params, blocks_k = [main.params[0]], blocks
        else:   # the cut var, a param now: aliased, and the alias removed by CanonicalizeBindings below
            cut = bindings[begin - 1].var
            params, blocks_k = [relax.Var(f"h{k}", cut.ty)], []
            body = [relax.VarBinding(cut, params[0]), *body]
        result = main.body.body if k == len(bounds) - 2 else bindings[end - 1].var
        outputs = relax.Tuple([result, relax.Tuple([masker.inputs[i] for i in own])])
        out = relax.Var("out", outputs.ty)
        body.append(relax.VarBinding(out, outputs))
        params += [aq] + [p for i in own for p in (masker.weights[i], masker.biases.get(i)) if p is not None]
        func = relax.Function(params, relax.SeqExpr([*blocks_k, relax.DataflowBlock(body)], out), out.ty)
        func = relax.utils.copy_with_new_vars(func)     # no var defined in two functions
        new[f"seg{k}"] = func.with_attrs({"num_input": len(params), "global_symbol": f"seg{k}"})
    new = relax.transform.CanonicalizeBindings()(new)
    return MaskedModule(relax.transform.Normalize()(new), {i: masker.constants[i] for i in ids}, segment_of,
                        masker.bias_constants)


def _cuts(bindings: list[relax.Binding], reads: list, output: relax.Expr, candidates: set) -> list[int]:
    """Indices of the bindings of `candidates` after which their var is the only one still needed (`reads`:
    the vars each binding reads)."""
    last_use = {}
    for j, used in enumerate(reads):
        for v in used:
            last_use[v] = j
    for v in relax.analysis.free_vars(output):
        last_use[v] = len(bindings)
    cuts, live = [], set()
    for j, binding in enumerate(bindings[:-1]):
        live = {v for v in live if last_use[v] > j}
        if last_use.get(binding.var, -1) > j:
            live.add(binding.var)
        if binding.var in candidates and live == {binding.var}:
            cuts.append(j)
    return cuts


class Simulation:
    """The compiled masked network: run(x, aq, weights) -> (logits, layer inputs). A run whose first quantized
    layer is in segment k starts there, from the FP32 input of that segment (kept for the last x of at most
    KEEP_SAMPLES samples run: 17 MiB a sample for EfficientNet-Lite0; scores use `--samples`, 8 by default)."""
    KEEP_SAMPLES = 32

    def __init__(self, imported: Imported, layers: list[Layer], target: Target, work_dir: str | Path,
                 tune_trials: int = 16) -> None:
        t0 = time.perf_counter()
        masked = masked_module(imported.mod, layers)
        self.fp32_weights, self.segment_of = masked.fp32_weights, masked.segment_of
        fused = tune.fuse(masked.mod, target)
        self.tune_stats = tune.tune(fused, target, Path(work_dir), tune_trials)
        self.tune_seconds = time.perf_counter() - t0
        scheduled = tune.apply(fused, target, Path(work_dir))
        self.vm = relax.VirtualMachine(build.compile_module(scheduled, target), tvm.cpu())
        self.segments = [self.vm[f"seg{k}"] for k in range(masked.segments)]
        self.layers = layers
        self.fp32_biases = masked.fp32_biases
        self.fp32_args = [[tvm.runtime.tensor(a) for a in (self.fp32_weights[layer.id], self.fp32_biases.get(layer.id))
                           if a is not None] for layer in layers]
        self._entries: tuple[bytes, list[list]] | None = None     # (digest of x, per sample the segment inputs)
        self.build_seconds = time.perf_counter() - t0

    def idle_mask(self) -> np.ndarray:
        row = np.array([1.0, 0.0, 2.0 ** 24, 0.0, 1.0], np.float32)
        return np.tile(row, (len(self.layers), 1))

    def _args(self, aq: np.ndarray | None, weights: dict[int, list[tvm.runtime.Tensor]] | None) -> list[list]:
        """Per segment: aq and the weights (and biases) of its layers."""
        aq = tvm.runtime.tensor(self.idle_mask() if aq is None else aq)
        args = [[aq] for _ in self.segments]
        for index, segment in enumerate(self.segment_of):
            args[segment].extend((weights or {}).get(index, self.fp32_args[index]))
        return args

    def run(self, x: np.ndarray, aq: np.ndarray | None = None, weights: dict[int, list[tvm.runtime.Tensor]] | None = None
            ) -> tuple[np.ndarray, list]:
        """Logits [N, classes] and, per sample, the inputs of the layers (batch-1 calls over x's leading axis)."""
        args, logits, inputs, entries = self._args(aq, weights), [], [], []
        for sample in x:
            h, seen, entry = tvm.runtime.tensor(np.ascontiguousarray(sample[None])), [], []
            for segment, segment_args in zip(self.segments, args):
                entry.append(h)
                h, ins = segment(h, *segment_args)
                seen.extend(ins)
            logits.append(h.numpy())
            inputs.append(seen)
            entries.append(entry)
        if aq is None and not weights and len(x) <= self.KEEP_SAMPLES:
            self._entries = (_digest(x), entries)
        return np.concatenate(logits), inputs

    def logits(self, x: np.ndarray, aq: np.ndarray, weights: dict[int, list[tvm.runtime.Tensor]]) -> np.ndarray:
        args = self._args(aq, weights)
        quantized = [i for i in range(len(self.layers)) if aq[i, 3] != 0 or i in weights]
        start = min((self.segment_of[i] for i in quantized), default=len(self.segments) - 1)
        if len(x) > self.KEEP_SAMPLES:
            start = 0
        if start and (self._entries is None or self._entries[0] != _digest(x)):
            self.run(x)
        out = []
        for s, sample in enumerate(x):
            h = self._entries[1][s][start] if start else tvm.runtime.tensor(np.ascontiguousarray(sample[None]))
            for segment, segment_args in zip(self.segments[start:], args[start:]):
                h = segment(h, *segment_args)[0]
            out.append(h.numpy())
        return np.concatenate(out)


def _digest(x: np.ndarray) -> bytes:
    import hashlib
    return hashlib.blake2b(np.ascontiguousarray(x).tobytes() + repr((x.shape, x.dtype)).encode()).digest()


def fake_quant_weight(layer: Layer, config: Config, weight: np.ndarray, reduce_range: bool) -> np.ndarray:
    """The weight as the kernel of `config` sees it: per-channel codes x scales, in the graph's layout."""
    rr = reduce_range and kernels.family(layer, config) == "dot"
    codes, scale = quantize_weights(kernels.ohwi(layer, weight), config.wbits, reduce_range=rr)
    deq = codes.astype(np.float32) * scale.reshape(-1, *[1] * (codes.ndim - 1))
    return (deq.reshape(deq.shape[0], -1).T if layer.op == "matmul" else deq).astype(np.float32)


def act_row(lo: float, hi: float, bits: int) -> np.ndarray:
    act = ActQuant.from_range(lo, hi, bits)
    return np.array([act.inv_scale, act.zero_point, 2 ** bits - 1, 1.0, act.scale], np.float32)


def layer_input(inputs: list, index: int) -> np.ndarray:
    """Every value layer `index` saw as input over the batch (`Simulation.run`'s per-sample inputs), flat."""
    return np.concatenate([sample[index].numpy().ravel() for sample in inputs])


def ranges_of(layers: list[Layer], inputs: list, percentile: float = CLIP_PERCENTILE) -> dict[str, tuple[float, float]]:
    """Per layer: [p, 100 - p] percentiles of its input values over the batch (the clipping rule)."""
    ranges = {}
    for i, layer in enumerate(layers):
        if layer.input_bounds is not None:     # the producer's clamp bounds it; real inputs fill it
            ranges[layer.id] = layer.input_bounds
            continue
        lo, hi = np.percentile(layer_input(inputs, i), [percentile, 100 - percentile])
        ranges[layer.id] = (float(lo), float(hi))
    return ranges


def means_of(layers: list[Layer], inputs: list) -> dict[str, tuple[float, ...]]:
    """Per layer: the mean of each channel of its input (the last axis: NHWC, or a matmul's K) over the batch."""
    return {layer.id: tuple(float(m) for m in np.concatenate(
        [sample[i].numpy().reshape(-1, sample[i].shape[-1]) for sample in inputs]).mean(0, dtype=np.float64))
        for i, layer in enumerate(layers)}


def corrected_bias(layer: Layer, weight: np.ndarray, quantized: np.ndarray, bias: np.ndarray,
                   input_mean: tuple[float, ...] | None) -> np.ndarray:
    """`bias` (a graph constant, e.g. [1, 1, 1, O]) plus the bias correction of `weight` quantized (scheme.py)."""
    if input_mean is None:
        return bias
    shift = kernels.bias_correction(kernels.ohwi(layer, weight), kernels.ohwi(layer, quantized), input_mean, layer.groups)
    return (bias + shift.reshape(bias.shape)).astype(np.float32)


def available(layer: Layer, configs: list[Config]) -> list[Config]:
    """Integer candidates that have a kernel for `layer` (depthwise/grouped: 8-bit activations only)."""
    return [c for c in configs if c.family != "fp32" and kernels.family(layer, c) is not None]


# ---------------------------------------------------------------------------------------------

def _relative_error(x: np.ndarray, xq: np.ndarray) -> float:
    return float(np.sum((xq - x) ** 2) / max(np.sum(x.astype(np.float64) ** 2), 1e-30))


def weight_error_scores(sim_weights: dict[str, np.ndarray], layers: list[Layer], configs: list[Config],
                        ranges: dict[str, tuple[float, float]], inputs: list, reduce_range: bool
                        ) -> dict[str, dict[str, float]]:
    """Hessian-free HAWQ: |Q(W) - W|^2 / |W|^2 + |Q(a) - a|^2 / |a|^2 on the calibration inputs a."""
    scores = {}
    for i, layer in enumerate(layers):
        w = sim_weights[layer.id]
        a = layer_input(inputs, i)
        act_error: dict[int, float] = {}
        scores[layer.id] = {"FP32": 0.0}
        for config in available(layer, configs):
            if config.abits not in act_error:
                act = ActQuant.from_range(*ranges[layer.id], config.abits)
                act_error[config.abits] = _relative_error(a, act.dequantize(act.quantize(a)))
            wq = fake_quant_weight(layer, config, w, reduce_range)
            scores[layer.id][config.name] = _relative_error(w, wq) + act_error[config.abits]
    return scores


def quantization_mask(sim: Simulation, layers: list[Layer], choice: dict[str, Config], calibration: Calibration,
                      reduce_range: bool) -> tuple[np.ndarray, dict[int, list[tvm.runtime.Tensor]]]:
    """The simulation's arguments that quantize each layer of `choice` as its candidate (the rest FP32): its
    activation row, its weight as the kernel sees it and its bias with the kernel's correction."""
    aq, params = sim.idle_mask(), {}
    for i, layer in enumerate(layers):
        config = choice.get(layer.id)
        if config is None or config.family == "fp32":
            continue
        aq[i] = act_row(*calibration.ranges[layer.id], config.abits)
        weight = sim.fp32_weights[layer.id]
        quantized = fake_quant_weight(layer, config, weight, reduce_range)
        params[i] = [tvm.runtime.tensor(quantized)]
        if layer.id in sim.fp32_biases:
            params[i].append(tvm.runtime.tensor(corrected_bias(layer, weight, quantized, sim.fp32_biases[layer.id],
                                                               calibration.means.get(layer.id))))
    return aq, params


def masked_scores(sim: Simulation, layers: list[Layer], configs: list[Config], calibration: Calibration,
                  x: np.ndarray, metric, reduce_range: bool) -> dict[str, dict[str, float]]:
    """metric(masked logits) for each layer x candidate, quantizing that layer alone."""
    scores = {}
    for layer in layers:
        scores[layer.id] = {"FP32": 0.0}
        for config in available(layer, configs):
            mask = quantization_mask(sim, layers, {layer.id: config}, calibration, reduce_range)
            scores[layer.id][config.name] = metric(sim.logits(x, *mask))
    return scores


class MixLoss:
    """KL divergence from FP32 of the whole model with every layer quantized as a configuration chooses, on
    MQE's inputs. Per-layer scores do not add up to this when many layers are quantized coarsely (their
    errors compound, or the output saturates); the flow checks its choice with it."""

    def __init__(self, sim: Simulation, layers: list[Layer], calibration: Calibration, x: np.ndarray,
                 reduce_range: bool) -> None:
        self.sim, self.layers, self.calibration, self.x, self.reduce_range = sim, layers, calibration, x, reduce_range
        self.reference = sim.run(x)[0]
        self.cache: dict[tuple, float] = {}

    def __call__(self, choice: dict[str, str]) -> float:
        key = tuple(sorted(choice.items()))
        if key not in self.cache:
            configs = {lid: parse_config(name) for lid, name in choice.items()}
            logits = self.sim.logits(self.x, *quantization_mask(self.sim, self.layers, configs, self.calibration,
                                                                self.reduce_range))
            self.cache[key] = float(kl_divergence(self.reference, logits).mean())
        return self.cache[key]


def scoring_inputs(model: str | Path, shape: tuple[int, ...], data, samples: int, seed: int,
                   macs: int = 0, distill_cache: Path | None = None, input_range: tuple[float, float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, str]:
    """(inputs the ranges come from, indices of the `samples` of them scores are computed on, source)."""
    x, source = calibration_inputs(model, shape, data, samples, seed, macs, distill_cache, input_range)
    if len(x) <= samples:
        return x, np.arange(len(x)), source
    return x, np.sort(np.random.default_rng(seed).choice(len(x), samples, replace=False)), source


def estimate(model: str | Path, imported: Imported, layers: list[Layer], configs: list[Config], target: Target, *,
             method: str = "mqe", calibration_data: str | Path | np.ndarray | None = None, samples: int = 8,
             seed: int = 0, work_dir: str | Path = "tuning_logs", tune_trials: int = 16,
             labels: np.ndarray | None = None, calibration: Calibration | None = None,
             simulation: Simulation | None = None, distill_cache: Path | None = None,
             input_range: tuple[float, float] | None = None) -> Sensitivity:
    """Scores of every (layer, candidate) by `method`; `calibration` reuses given ranges (e.g. distilled ones);
    `input_range`: the model input's bounds, when known (`calibration_inputs`)."""
    if method not in METHODS:
        raise OhqError(f"unknown --sensitivity {method!r}; choose from {', '.join(METHODS)}")
    if method == "accuracy" and (calibration_data is None or labels is None):
        raise OhqError("--sensitivity accuracy needs labelled --calibration-data (an .npz with x and y)")
    t0 = time.perf_counter()
    stages = {}
    x, pick, source = scoring_inputs(model, imported.input_shape, calibration_data, samples, seed,
                                     sum(layer.macs for layer in layers), distill_cache, input_range)
    scored = x[pick]
    stages["inputs"] = time.perf_counter() - t0
    sim = simulation or Simulation(imported, layers, target, work_dir, tune_trials)
    stages["build"] = 0.0 if simulation else sim.build_seconds
    t1 = time.perf_counter()
    ref, inputs = sim.run(x)
    if calibration is None:
        calibration = Calibration(ranges_of(layers, inputs), source, means_of(layers, inputs))
    stages["ranges"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    reduce_range = kernels.isa_of(target.tvm).reduce_range
    if method == "weight-error":
        scores = weight_error_scores(sim.fp32_weights, layers, configs, calibration.ranges, inputs, reduce_range)
    else:
        if method != "accuracy" and len(pick) < len(x):   # ranges from every input, scores from `samples`
            x, ref = x[pick], ref[pick]
        metric = {"mqe": lambda z: float(kl_divergence(ref, z).mean()),
                  "output-mse": lambda z: float(np.mean((z - ref) ** 2)),
                  "accuracy": lambda z: float((ref.argmax(-1) == labels).mean() - (z.argmax(-1) == labels).mean()),
                  }[method]
        scores = masked_scores(sim, layers, configs, calibration, x, metric, reduce_range)
    stages["scores"] = time.perf_counter() - t1
    return Sensitivity(method, scores, calibration, time.perf_counter() - t0, stages, scored, sim)


def calibration_inputs(model: str | Path, shape: tuple[int, ...], data, samples: int, seed: int,
                       macs: int = 0, distill_cache: Path | None = None,
                       input_range: tuple[float, float] | None = None) -> tuple[np.ndarray, str]:
    """Real data if given; else inputs distilled from BN statistics (`macs`: per sample, see DISTILL_MAX_MACS);
    else noise. `input_range`: the model input's bounds, when known (data-free inputs stay in it)."""
    if data is not None:
        return load_calibration_data(data, shape), "data"
    if macs <= DISTILL_MAX_MACS and bn_statistics(onnx.load(str(model), load_external_data=False)):
        steps = 200 if macs <= DISTILL_LARGE_MACS else DISTILL_LARGE_STEPS
        return distill(model, shape, samples, seed, steps, cache_dir=distill_cache, input_range=input_range), \
            "distilled"
    return noise_inputs(shape, samples, seed, input_range), "noise"


# ---------------------------------------------------------------------------------------------

def score_table(result: Sensitivity, layers: list[Layer], configs: list[Config]):
    from rich.table import Table
    table = Table(title=f"{result.method} sensitivity ({result.calibration.source} inputs, {result.seconds:.1f} s); "
                        "- = no integer kernel")
    table.add_column("layer")
    table.add_column("kind")
    table.add_column("input range", justify="right")
    for config in configs:
        table.add_column(config.name, justify="right")
    for layer in layers:
        row = result.scores[layer.id]
        lo, hi = result.calibration.ranges[layer.id]
        table.add_row(layer.id, layer.kind, f"[{lo:.3g}, {hi:.3g}]",
                      *("-" if c.name not in row else f"{row[c.name]:.3g}" for c in configs))
    return table


def main(argv: list[str] | None = None) -> int:
    import json

    from rich.console import Console

    from .cli import ArgumentParser, common_args, input_range_arg, parse_bits, quiet_tvm_logs
    from .frontend import load_onnx, parse_shape
    from .layers import find_layers
    from .measure import candidates_for_bits
    from .target import parse_target

    parser = ArgumentParser(prog="python -m ohq_tvm.mqe", description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--sensitivity", default="mqe", choices=METHODS, help="estimator (default mqe)")
    parser.add_argument("--calibration-data", type=Path,
                        help="folder of images, .npy, or .npz with x (and y: labels, for --sensitivity accuracy)")
    input_range_arg(parser)
    parser.add_argument("--bits", default="8,4,2,1", help="allowed weight/activation bit-widths (default 8,4,2,1)")
    parser.add_argument("--samples", type=int, default=8,
                        help="synthetic inputs, or the calibration inputs that score candidates (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-trials", type=int, default=16, help="MetaSchedule trials per missing kernel")
    parser.add_argument("--json", type=Path, help="write the scores as JSON")
    args = parser.parse_args(argv)
    bits = parse_bits(args.bits)
    if args.samples < 1:
        raise OhqError("--samples must be >= 1")
    quiet_tvm_logs()
    target = parse_target(args.target, args.threads)
    imported = load_onnx(args.model, parse_shape(args.input_shape) if args.input_shape else None)
    layers = find_layers(imported.mod)
    configs = candidates_for_bits(bits)
    data, labels = args.calibration_data, None
    if data is not None and data.suffix == ".npz" and data.is_file():
        with np.load(data) as archive:
            if "y" in archive:
                labels = archive["y"].astype(np.int64)
    console = Console(stderr=True)
    with console.status(f"{args.sensitivity}: {len(layers)} layers x {len(configs)} candidates"):
        result = estimate(args.model, imported, layers, configs, target, method=args.sensitivity,
                          calibration_data=data, samples=args.samples, seed=args.seed, work_dir=args.work_dir,
                          tune_trials=args.tune_trials, labels=labels,
                          input_range=args.input_range)
    Console().print(score_table(result, layers, configs))
    console.print("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.stages.items()))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    from .errors import run_cli
    run_cli(main)
