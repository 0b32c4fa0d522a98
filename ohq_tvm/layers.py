"""The table of quantizable layers: every conv2d and matmul whose weight is a constant."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprVisitor, visitor

QUANTIZABLE = ("relax.nn.conv2d", "relax.matmul")


@dataclass(frozen=True)
class Layer:
    id: str                          # stable: op name + order of appearance in main, e.g. conv3
    op: str                          # "conv2d" | "matmul"
    kind: str                        # "conv" | "depthwise" | "grouped" | "dense"
    input_shape: tuple[int, ...]     # conv: NHWC
    weight_shape: tuple[int, ...]    # conv: OHWI (I = input channels per group); matmul: (K, N)
    output_shape: tuple[int, ...]    # conv: NHWC
    strides: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0, 0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    codes_in: bool = False           # its input is another layer's result only: codes when both are quantized
    codes_out: bool = False          # its result feeds another layer only
    input_bounds: tuple[float, float] | None = None   # codes_in from a clamping producer: its clamp, e.g. ReLU6

    @property
    def macs(self) -> int:
        if self.op == "conv2d":
            o, kh, kw, i = self.weight_shape
            return int(np.prod(self.output_shape)) * i * kh * kw
        return int(np.prod(self.output_shape)) * self.weight_shape[0]

    @property
    def weight_count(self) -> int:
        return int(np.prod(self.weight_shape))

    def weight_bytes(self, bits: int = 32) -> int:
        return (self.weight_count * bits + 7) // 8

    @property
    def workload(self) -> tuple:
        """Layers with equal workloads run the same kernel: measure once."""
        return (self.op, self.input_shape, self.weight_shape, self.strides, self.padding,
                self.dilation, self.groups, self.codes_in, self.codes_out)


def _shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _is_const(expr: relax.Expr) -> bool:
    return isinstance(expr, tvm.ir.expr.GenericConst)


@visitor
class _Collector(PyExprVisitor):
    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self.weights: list[relax.Expr] = []       # the weight constant of each layer
        self.counts = {"conv2d": 0, "matmul": 0}

    def visit_call_(self, call: relax.Call) -> None:
        for arg in call.args:
            self.visit_expr(arg)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name in QUANTIZABLE and _is_const(call.args[1])):
            return
        op = call.op.name.split(".")[-1]
        lid = f"{op}{self.counts[op]}"
        self.counts[op] += 1
        x, w, out = _shape(call.args[0]), _shape(call.args[1]), _shape(call)
        if op == "conv2d":
            a = call.attrs
            if a.data_layout != "NHWC" or a.kernel_layout != "OHWI" or a.out_layout != "NHWC":
                return
            groups = int(a.groups)
            kind = "conv" if groups == 1 else "depthwise" if groups == x[3] == w[0] else "grouped"
            self.layers.append(Layer(lid, op, kind, x, w, out, tuple(map(int, a.strides)),
                                     tuple(map(int, a.padding)), tuple(map(int, a.dilation)), groups))
            self.weights.append(call.args[1])
        elif len(w) == 2:
            self.layers.append(Layer(lid, op, "dense", x, w, out))
            self.weights.append(call.args[1])


def find_layers(mod: tvm.IRModule) -> list[Layer]:
    """The table, with the links along which quantized layers pass each other codes (measured so)."""
    from .rewrite import integer_links    # the rewrite's epilogue chains decide what is linked
    pairs = layer_weights(mod)
    links = integer_links(mod["main"], {w: layer for layer, w in pairs})
    producers = {p for p, _ in links.values()}
    bounds = {c: clamp for c, (_, clamp) in links.items() if np.isfinite(clamp).all()}
    return [replace(layer, codes_in=layer.id in links, codes_out=layer.id in producers,
                    input_bounds=bounds.get(layer.id)) for layer, _ in pairs]


def layer_weights(mod: tvm.IRModule) -> list[tuple[Layer, relax.Expr]]:
    """Each layer with its weight constant (the handle passes use to find the layer's call)."""
    collector = _Collector()
    collector.visit_expr(mod["main"])
    return list(zip(collector.layers, collector.weights))


def copy_module(mod: tvm.IRModule) -> tvm.IRModule:
    """A shallow copy: mutators' block builders edit the module they are given in place."""
    return tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs, global_infos=mod.global_infos)


def layer_table(layers: list[Layer]):
    """A rich table of the layers (id, kind, shapes, MACs, weight KiB)."""
    from rich.table import Table
    table = Table(title=f"{len(layers)} quantizable layers")
    for col in ("id", "kind", "input NHWC", "weight OHWI", "stride", "MMACs", "weights KiB"):
        table.add_column(col, justify="right" if col in ("MMACs", "weights KiB") else "left")
    for layer in layers:
        table.add_row(layer.id, layer.kind, "x".join(map(str, layer.input_shape)),
                      "x".join(map(str, layer.weight_shape)),
                      str(layer.strides[0]) if layer.op == "conv2d" else "",
                      f"{layer.macs / 1e6:.2f}", f"{layer.weight_bytes() / 1024:.1f}")
    return table
