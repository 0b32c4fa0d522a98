"""Rewrite: every chosen layer becomes a call to its integer kernel (a Relax module pass).

``QuantizeLayers(plan)`` finds each planned conv2d / matmul by its weight constant, absorbs the
chain of bindings that only it feeds — per-channel bias adds, then ReLU / ReLU6 / clip / maximum /
minimum — into the kernel's epilogue constants, and binds the chain's last variable to
``call_tir(kernel, x, packed weights, channel params, quantization params)``. Where a quantized
layer's result feeds only another quantized layer, it crosses as uint8 codes: the producer's
epilogue quantizes for the consumer, which skips its own input quantizer. The kernels are
already scheduled and marked opaque, so fusion and MetaSchedule leave them alone while the FP32
layers and glue ops around them fuse and are tuned as usual::

    seq = tvm.transform.Sequential([QuantizeLayers(plan, target), relax.get_pipeline("zero")])
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from . import kernels
from .kernels import ActQuant, Config, Io, Knobs
from .layers import Layer, copy_module, layer_weights

OPAQUE = 8   # relay/relax OpPatternKind kOpaque: FuseOps never fuses across the kernel
KERNEL_PREFIX = "ohq_"    # the names of the integer kernels the pass adds


@dataclass(frozen=True)
class LayerPlan:
    """What the rewrite needs to quantize one layer."""
    config: Config
    knobs: Knobs
    act_range: tuple[float, float]     # calibrated range of the layer's input
    input_mean: tuple[float, ...] | None = None   # calibrated mean of each input channel: the bias correction


@dataclass
class Chain:
    """A layer's call and the epilogue bindings only it feeds."""
    layer: Layer
    x: relax.Expr
    weight: np.ndarray
    bias: np.ndarray | None = None
    clamp: tuple[float, float] = (-np.inf, np.inf)
    absorbed: list[str] = field(default_factory=list)
    inner: list[relax.Var] = field(default_factory=list)   # bindings the chain replaces, but its last
    producer: "Chain | None" = None    # the chain whose result is x, if x feeds nothing else
    consumer: "Chain | None" = None


def _const(expr: relax.Expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


def _op(value: relax.Expr) -> str | None:
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


def _absorb(chain: Chain, var: relax.Var, value: relax.Expr) -> bool:
    """Fold one consumer binding `value` of `var` into the chain's epilogue, if it is one we can fold."""
    op, channels = _op(value), chain.layer.output_shape[-1]
    if op == "relax.nn.relu":
        chain.clamp = (max(chain.clamp[0], 0.0), chain.clamp[1])
    elif op == "relax.clip":
        lo, hi = (float(a.value) for a in value.args[1:3])
        chain.clamp = (max(chain.clamp[0], lo), min(chain.clamp[1], hi))
    elif op in ("relax.maximum", "relax.minimum", "relax.add"):
        other = value.args[1] if value.args[0].same_as(var) else value.args[0]
        c = _const(other)
        if c is None:
            return False
        if op == "relax.add":   # per-channel bias, only before any clamp
            if c.size != channels or c.shape[-1:] != (channels,) or chain.clamp != (-np.inf, np.inf):
                return False
            chain.bias = c.reshape(channels) + (0 if chain.bias is None else chain.bias)
        elif c.size != 1:
            return False
        elif op == "relax.maximum":
            chain.clamp = (max(chain.clamp[0], float(c)), chain.clamp[1])
        else:
            chain.clamp = (chain.clamp[0], min(chain.clamp[1], float(c)))
    else:
        return False
    chain.absorbed.append(op.split(".")[-1])
    return chain.clamp[0] <= chain.clamp[1]


def integer_links(func: relax.Function, layers: dict[relax.Expr, Layer]) -> dict[str, tuple[str, tuple[float, float]]]:
    """consumer layer id -> (producer layer id, the producer's clamp) where one layer's result, after its
    epilogue, feeds only the other: when both are quantized, the activation crosses as codes."""
    chains = find_chains(func, layers)
    return {c.layer.id: (c.producer.layer.id, c.producer.clamp) for c in chains.values() if c.producer is not None}


def find_chains(func: relax.Function, layers: dict[relax.Expr, Layer]) -> dict[relax.Var, Chain]:
    """Chains keyed by the variable their result is bound to (the last absorbed binding)."""
    values: dict[relax.Var, relax.Expr] = {}
    users: dict[relax.Var, list[relax.Var]] = {}
    uses: Counter = Counter()
    for block in func.body.blocks:
        for binding in block.bindings:
            values[binding.var] = binding.value
            for arg in relax.analysis.free_vars(binding.value):
                uses[arg] += 1
                users.setdefault(arg, []).append(binding.var)
    for var in relax.analysis.free_vars(func.body.body):
        uses[var] += 1
    chains = {}
    for var, value in values.items():
        if _op(value) not in ("relax.nn.conv2d", "relax.matmul"):
            continue
        layer = next((layer for w, layer in layers.items() if w.same_as(value.args[1])), None)
        if layer is None:
            continue
        chain, end = Chain(layer, value.args[0], _const(value.args[1])), var
        while uses[end] == 1 and end in users and _absorb(chain, end, values[users[end][0]]):
            chain.inner.append(end)
            end = users[end][0]
        chains[end] = chain
    for chain in chains.values():
        producer = chains.get(chain.x)
        if producer is not None and uses[chain.x] == 1:
            producer.consumer, chain.producer = chain, producer
    return chains


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan: dict[str, LayerPlan], target: tvm.target.Target,
                 codes: bool) -> None:
        super().__init__(mod)
        self.plan, self.target, self.isa, self.codes = plan, target, kernels.isa_of(target), codes
        self.chains: dict[relax.Var, Chain] = {}
        self.replaced: set[relax.Var] = set()    # inner bindings of planned chains: dropped, not visited
        self.kernels: dict[tuple, relax.GlobalVar] = {}
        self.records: list[dict] = []

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.replaced:   # its input may now be codes: the float op would not type-check
            return
        chain = self.chains.get(binding.var)
        if chain is None or chain.layer.id not in self.plan:
            return super().visit_var_binding_(binding)
        call = self._kernel_call(chain, self.plan[chain.layer.id], self.visit_expr(chain.x))
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(call, name_hint=binding.var.name))

    def _quantized(self, chain: Chain | None) -> LayerPlan | None:
        """The plan of a linked neighbour, if it is quantized (and codes may cross)."""
        return self.plan.get(chain.layer.id) if chain is not None and self.codes else None

    def _kernel_call(self, chain: Chain, plan: LayerPlan, x: relax.Expr) -> relax.Call:
        layer, config = chain.layer, plan.config
        act = ActQuant.from_range(*plan.act_range, config.abits)
        consumer = self._quantized(chain.consumer)
        out_act = ActQuant.from_range(*consumer.act_range, consumer.config.abits) if consumer else None
        io = Io(codes_in=self._quantized(chain.producer) is not None, codes_out=out_act is not None)
        packed = kernels.pack(layer, config, plan.knobs, self.isa, chain.weight, chain.bias, act, chain.clamp, out_act,
                              plan.input_mean)
        key = (layer.workload, config, plan.knobs, io)
        if key not in self.kernels:
            func = kernels.build(layer, config, plan.knobs, self.target, io)
            func = func.with_attr({"op_pattern": OPAQUE, "tirx.is_scheduled": True})
            name = f"{KERNEL_PREFIX}{layer.op}_{config.name.lower()}_{len(self.kernels)}"
            self.kernels[key] = self.builder_.add_func(func.without_attr("global_symbol"), name)
        self.records.append({"layer": layer.id, "config": config.name, "kernel": self.kernels[key].name_hint,
                             "knobs": [plan.knobs.tile_w, plan.knobs.tile_o],
                             "act_scale": act.scale, "act_zero_point": act.zero_point,
                             "clamp": [float(v) for v in chain.clamp], "epilogue": chain.absorbed,
                             "input": "codes" if io.codes_in else "float",
                             "output": f"codes of {chain.consumer.layer.id}" if io.codes_out else "float"})
        args = [x, *(relax.const(a) for a in (packed.w, packed.chan, packed.q))]
        return relax.call_tir(self.kernels[key], args, relax.TensorType(layer.output_shape, io.out_dtype))


@tvm.transform.module_pass(opt_level=0, name="ohq.QuantizeLayers")
class QuantizeLayers:
    """Replace the planned layers of ``main`` with their integer kernels.

    `plan` maps layer ids (``ohq_tvm.layers.find_layers``) to the candidate, kernel knobs and input
    range; layers not in the plan stay FP32. After the pass, `records` describes each replaced layer
    (kernel, scales, absorbed epilogue, codes in / out) for the build's sidecar. `codes=False` keeps every
    activation float between kernels (each kernel quantizes its own input), e.g. to compare.
    """

    def __init__(self, plan: dict[str, LayerPlan], target: tvm.target.Target | None = None, codes: bool = True) -> None:
        self.plan, self.target, self.codes = plan, target, codes
        self.records: list[dict] = []

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current()
        if target is None:
            raise ValueError("QuantizeLayers needs a target (argument or `with target:`)")
        rewriter = _Rewriter(copy_module(mod), self.plan, target, self.codes)
        rewriter.chains = find_chains(mod["main"], {w: layer for layer, w in layer_weights(mod)})
        rewriter.replaced = {v for c in rewriter.chains.values() if c.layer.id in self.plan for v in c.inner}
        missing = set(self.plan) - {c.layer.id for c in rewriter.chains.values()}
        if missing:
            raise ValueError(f"planned layers not found in main: {', '.join(sorted(missing))}")
        main = rewriter.visit_expr(mod["main"])
        rewriter.builder_.update_func(mod.get_global_var("main"), main)
        self.records = sorted(rewriter.records, key=lambda r: r["layer"])
        return relax.transform.DeadCodeElimination(entry_functions=["main"])(rewriter.builder_.get())


def hollow(mod: tvm.IRModule) -> tvm.IRModule:
    """`mod` with the body of every integer kernel emptied: built and timed, what the network costs besides its
    quantized layers (glue ops, FP32 layers, the VM's calls and allocations)."""
    return tvm.IRModule({gv: func.with_body(tvm.tirx.Evaluate(0)) if gv.name_hint.startswith(KERNEL_PREFIX)
                         else func for gv, func in mod.functions.items()}, attrs=mod.attrs)
