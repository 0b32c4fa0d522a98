"""Depthwise and grouped convolutions with 8-bit activations: no channel reduction to put in a
dot-4 intrinsic, so the multiply-adds are vectorized across output channels (widening int
arithmetic LLVM picks per ISA). Weight codes are stored one per int8 whatever their bit-width:
depthwise weights are a few KiB and never the bottleneck.
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te

from .conv import Geometry, Io, Knobs, _ceil, _vectorize_inner, epilogue_value, quantized_input, schedule_elementwise
from .isa import Isa


def knob_space(g: Geometry, isa: Isa) -> list[Knobs]:
    """Accumulator tiles that leave two registers for the operands, at most 16 (the weights can be memory
    operands: on AVX2's 16 registers, 14 accumulators ran ~25% faster than the 8 of a half-file bound)."""
    vectors = _ceil(g.o, isa.lanes) // isa.lanes
    tiles = [Knobs(tw, nb) for tw in (1, 2, 4, 7, 8, 14) for nb in (1, 2, 4)
             if g.ow % tw == 0 and vectors % nb == 0 and tw * nb <= min(isa.registers - 2, 16)]
    tiles.sort(key=lambda k: (-(k.tile_w * k.tile_o), -k.tile_o))
    return tiles[:6] or [Knobs(1, 1)]


def grouped_kernel(g: Geometry, x_shape: tuple[int, ...], isa: Isa, knobs: Knobs, io: Io = Io()) -> tvm.tirx.PrimFunc:
    og, cg = g.o // g.groups, g.c // g.groups
    o_pad = _ceil(g.o, isa.lanes * knobs.tile_o)
    x = te.placeholder(x_shape, io.in_dtype, name="x")
    w = te.placeholder((g.kh, g.kw, cg, o_pad), "int8", name="w")
    chan = te.placeholder((2, g.o), "float32", name="chan")
    q = te.placeholder((4,), "float32", name="q")

    a = te.compute((g.n, g.hp, g.wp, g.c), quantized_input(x, g, q, 255, "uint8"), name="a")
    ry, rx, rc = te.reduce_axis((0, g.kh), "ry"), te.reduce_axis((0, g.kw), "rx"), te.reduce_axis((0, cg), "rc")
    sh, sw = g.strides
    channel = (lambda o, c: te.min(o, g.o - 1)) if cg == 1 and og == 1 else (lambda o, c: te.min(o // og, g.groups - 1) * cg + c)
    acc = te.compute((g.n, g.oh, g.ow, o_pad), lambda n, h, w_, o: te.sum(
        a[n, h * sh + ry, w_ * sw + rx, channel(o, rc)].astype("int32") * w[ry, rx, rc, o].astype("int32"),
        axis=[ry, rx, rc]), name="acc")
    out = te.compute((g.n, g.oh, g.ow, g.o), lambda n, h, w_, o: epilogue_value(
        acc[n, h, w_, o].astype("float32") * chan[0, o] + chan[1, o], q, io), name="out")

    sch = s_tir.Schedule(te.create_prim_func([x, w, chan, q, out]))
    if io.codes_in:     # padding by bounds checks in the loads beat a padded copy (0.65-0.9x, AVX2)
        sch.compute_inline(sch.get_sblock("a"))
    else:               # float input: quantized once, not once per tap
        schedule_elementwise(sch, sch.get_sblock("a"))
    block = sch.get_sblock("acc")
    n, h, w_, o, lry, lrx, lrc = sch.get_loops(block)
    wo, wi = sch.split(w_, [None, knobs.tile_w])
    oo, ob, oi = sch.split(o, [None, knobs.tile_o, isa.lanes])
    sch.reorder(n, h, wo, oo, lrc, lry, lrx, wi, ob, oi)
    sch.parallel(sch.fuse(n, h, wo, oo))      # accumulators on the stack: see conv._schedule_dot
    out_block = sch.get_sblock("out")
    sch.reverse_compute_at(out_block, sch.get_loops(block)[0])
    _vectorize_inner(sch, out_block)
    for loop in (lry, lrx, wi, ob):
        sch.unroll(loop)
    sch.vectorize(oi)
    init = sch.decompose_reduction(block, lrc)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


def pack_grouped_weights(codes: np.ndarray, isa: Isa, knobs: Knobs) -> np.ndarray:
    """Codes [O, KH, KW, C/groups] -> [KH, KW, C/groups, O padded to whole tiles] int8."""
    o = codes.shape[0]
    padded = np.zeros((_ceil(o, isa.lanes * knobs.tile_o),) + codes.shape[1:], np.int8)
    padded[:o] = codes
    return np.ascontiguousarray(padded.transpose(1, 2, 3, 0))
