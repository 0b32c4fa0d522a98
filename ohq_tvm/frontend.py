"""ONNX -> Relax: one static input, weights bound as constants, BatchNorm folded, NHWC layout.

Convolutions are converted to NHWC activations / OHWI weights (one transpose at the model input):
the integer kernels and the scheduled FP32 kernels all work on channels-last tensors.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.relax.frontend.onnx import from_onnx, onnx_frontend

from .errors import OhqError, last_line


@dataclass(frozen=True)
class Imported:
    mod: tvm.IRModule            # main(input) -> output, params bound and folded, convs NHWC/OHWI
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    ops: tuple[str, ...]         # ONNX op types in the model, for the report


def _read(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise OhqError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise OhqError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise OhqError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if not model.graph.node:
        raise OhqError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _single_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OhqError(f"model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                       "exactly one image/feature input is supported")
    return inputs[0]


def _static_shape(inp: onnx.ValueInfoProto, override: tuple[int, ...] | None) -> tuple[int, ...]:
    dims = inp.type.tensor_type.shape.dim
    declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if override is not None:
        if len(override) != len(declared) or any(d is not None and d != o for d, o in zip(declared, override)):
            shown = ",".join("?" if d is None else str(d) for d in declared)
            raise OhqError(f"--input-shape {','.join(map(str, override))} does not fit input "
                           f"'{inp.name}' of shape [{shown}]")
        return tuple(override)
    if any(d is None for d in declared):
        shown = ",".join(d.dim_param or "?" if not d.dim_value else str(d.dim_value) for d in dims)
        raise OhqError(f"input '{inp.name}' has dynamic dimensions [{shown}]; pass --input-shape, "
                       f"e.g. --input-shape {','.join(str(d or 1) for d in declared)}")
    return tuple(declared)


def load_onnx(path: str | Path, input_shape: tuple[int, ...] | None = None) -> Imported:
    path = Path(path)
    model = _read(path)
    inp = _single_input(model)
    elem = inp.type.tensor_type.elem_type
    if elem != onnx.TensorProto.FLOAT:
        raise OhqError(f"input '{inp.name}' is {onnx.TensorProto.DataType.Name(elem)}; "
                       "only float32 inputs are supported")
    shape = _static_shape(inp, input_shape)
    ops = tuple(n.op_type for n in model.graph.node)
    unknown = sorted(set(ops) - set(onnx_frontend._get_convert_map()))
    if unknown:
        raise OhqError(f"the TVM ONNX importer cannot read operator(s): {', '.join(unknown)}")
    _check_with_onnxruntime(path)
    failure = None
    try:
        mod = _bind_and_fold(from_onnx(model, shape_dict={inp.name: list(shape)}, keep_params_in_input=True))
    except Exception as e:
        failure = last_line(e)
    if failure is not None:
        _free_quietly()
        raise OhqError(f"TVM could not import {path.name}: {failure}")
    return Imported(mod=mod, input_name=inp.name, input_shape=shape, input_dtype="float32", ops=ops)


def _check_with_onnxruntime(path: Path) -> None:
    """onnxruntime, our reference, must load the model: it rejects what the checker lets through (e.g. dilations
    of 0, shapes that do not add up) with a clear message, where TVM would fail deep inside a pass."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OhqError(f"{path}: invalid ONNX model (onnxruntime: {_first_line(e).split('failed:')[-1].strip()})") from None


def _free_quietly() -> None:
    """A failed import leaves a half-built BlockBuilder whose destructor warns on stderr: free it now, muted."""
    import gc
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        gc.collect()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@mutator
class _ClampToOps(PyExprMutator):
    """The ONNX importer emits Clip as call_tir(maximum/minimum) PrimFuncs, which ConvertLayout
    cannot see through (it wraps each in two transposes) and which do not fuse into the conv:
    turn them back into Relax operators."""
    OPS = {"maximum": relax.op.maximum, "minimum": relax.op.minimum}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if call.op != tvm.ir.Op.get("relax.call_tir"):
            return call
        name = call.args[0].name_hint.rstrip("0123456789")
        args = call.args[1].fields
        if name in self.OPS and len(args) == 2 and isinstance(args[1], tvm.ir.expr.GenericConst) \
                and len(args[1].ty.shape) == 0:
            return self.OPS[name](args[0], args[1])
        return call


def _rewrite_functions(mutator_: PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """`mutator_` (built on `mod`) over every Relax function of `mod`, then the bindings it left dead dropped."""
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator_.builder_.update_func(gv, mutator_.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator_.builder_.get())


@tvm.transform.module_pass(opt_level=0, name="ClampToOps")
def clamp_to_ops(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _rewrite_functions(_ClampToOps(mod), mod)


_NUMPY_OPS = {
    "add": np.add, "subtract": np.subtract, "multiply": np.multiply, "divide": np.divide, "maximum": np.maximum,
    "minimum": np.minimum, "where": np.where, "isnan": np.isnan, "sqrt": np.sqrt, "negative": np.negative,
    # the result is cast and reshaped to the call's type afterwards
    **dict.fromkeys(("astype", "reshape", "expand_dims", "squeeze", "flatten"), lambda x: x),
}


def _numpy_op(call: relax.Call):
    """numpy for the relax operators that fold weights (BN into conv, the OHWI transposes); None for others."""
    name = call.op.name.removeprefix("relax.")
    if name == "divide" and not str(call.ty.dtype).startswith("float"):    # integer division rounds its own way
        return None
    if name == "permute_dims":
        axes = call.attrs.axes
        return lambda x: np.transpose(x, None if axes is None else [int(a) for a in axes])
    if name in ("ones", "zeros", "broadcast_to"):    # (a gradient's seed and its spread over a mean's input)
        shape = [int(d) for d in call.ty.shape.values]
        return (lambda x: np.broadcast_to(x, shape)) if name == "broadcast_to" else \
            (lambda: np.full(shape, float(name == "ones")))
    return _NUMPY_OPS.get(name)


@mutator
class _NumpyFold(PyExprMutator):
    """Fold calls on constants with numpy (correctly rounded float32 ops, so the same bits): FoldConstant
    compiles each one with LLVM (280 builds, ~14 s for EfficientNet-Lite0). What numpy does not know is
    left to FoldConstant."""

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = self.visit_expr_post_order(call)
        if not isinstance(call.op, tvm.ir.Op) or not isinstance(call.ty, relax.TensorType):
            return call
        shape = call.ty.shape
        if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
            return call
        func = _numpy_op(call)
        tensors = [self._constant(a) for a in call.args if not isinstance(a, relax.ShapeExpr)]
        if func is None or not (tensors or call.op.name in ("relax.ones", "relax.zeros")) \
                or any(t is None for t in tensors):
            return call
        with np.errstate(all="ignore"):
            value = func(*tensors)
        return relax.const(np.asarray(value).astype(str(call.ty.dtype)).reshape([int(d) for d in shape.values]))

    def _constant(self, arg: relax.Expr) -> np.ndarray | None:
        while isinstance(arg, relax.Var):      # through aliases (a gradient's adjoints are chains of them)
            arg = self.lookup_binding(arg)
        if isinstance(arg, (tvm.tirx.IntImm, tvm.tirx.FloatImm)):     # a scalar operand, e.g. BN's epsilon
            return np.array(arg.value, str(arg.ty))
        return arg.value.numpy() if isinstance(arg, tvm.ir.expr.GenericConst) else None


@tvm.transform.module_pass(opt_level=0, name="NumpyFold")
def numpy_fold(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return _rewrite_functions(_NumpyFold(mod), mod)


def _bind_and_fold(mod: tvm.IRModule) -> tvm.IRModule:
    mod, params = relax.frontend.detach_params(mod)
    names = [v.name for v in mod["main"].params[1:]]
    mod = relax.transform.BindParams("main", dict(zip(names, params.get("main", []))))(mod)
    return tvm.transform.Sequential([
        numpy_fold,
        relax.transform.FoldConstant(),
        clamp_to_ops,
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),   # BN not after a conv -> elementwise
        numpy_fold,
        relax.transform.FoldConstant(),               # ConvertLayout segfaults on computed weights
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]}),
        relax.transform.CanonicalizeBindings(),
        numpy_fold,
        relax.transform.FoldConstant(),
        relax.transform.DeadCodeElimination(),
    ])(mod)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise OhqError(f"--input-shape {text!r}: expected comma-separated integers, e.g. 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise OhqError(f"--input-shape {text!r}: dimensions must be positive")
    return shape


def run_onnxruntime(path: str | Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    """Reference output (first output) from onnxruntime."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
