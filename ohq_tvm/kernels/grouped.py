"""Depthwise and grouped convolutions with 8-bit activations: no channel reduction to put in a
dot-4 intrinsic, so the multiply-adds are vectorized across output channels (widening int
arithmetic LLVM picks per ISA). Weight codes are stored one per int8 whatever their bit-width:
depthwise weights are a few KiB and never the bottleneck.

Low-bit weights leave int16 headroom: a product is at most 255 * 7 at 4 bits, so the taps of a few
kernel rows (all 9 of a 3x3 at 4 bits) sum exactly in int16 lanes, twice as many per vector as int32
and with a cheaper multiply, and are widened once per rows chunk (`int16_rows`).
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te

from .conv import Geometry, Io, Knobs, _ceil, _vectorize_inner, epilogue_value, quantized_input, schedule_elementwise
from .isa import Isa
from .scheme import int16_products, weight_qmax


def int16_rows(g: Geometry, wbits: int) -> int:
    """Kernel rows whose u8 x weight products sum exactly in int16 (the last chunk of rows may be shorter);
    0: not even one row (8-bit weights), the sums are int32."""
    return min(g.kh, int16_products(weight_qmax(wbits)) // (g.kw * (g.c // g.groups)))


def lanes(g: Geometry, isa: Isa, wbits: int) -> int:
    """Accumulator lanes of one vector register: int16 (two per int32 lane) where `int16_rows` allows."""
    return isa.lanes * (2 if int16_rows(g, wbits) else 1)


def knob_space(g: Geometry, isa: Isa, wbits: int = 8) -> list[Knobs]:
    """Accumulator tiles that leave two registers for the operands, at most 16 (the weights can be memory
    operands: on AVX2's 16 registers, 14 accumulators ran ~25% faster than the 8 of a half-file bound)."""
    vl = lanes(g, isa, wbits)
    vectors = _ceil(g.o, vl) // vl
    tiles = [Knobs(tw, nb) for tw in (1, 2, 4, 7, 8, 14) for nb in (1, 2, 4)
             if g.ow % tw == 0 and vectors % nb == 0 and tw * nb <= min(isa.registers - 2, 16)]
    tiles.sort(key=lambda k: (-(k.tile_w * k.tile_o), -k.tile_o))
    return tiles[:6] or [Knobs(1, 1)]


def grouped_kernel(g: Geometry, x_shape: tuple[int, ...], isa: Isa, knobs: Knobs, io: Io = Io(), wbits: int = 8
                   ) -> tvm.tirx.PrimFunc:
    og, cg = g.o // g.groups, g.c // g.groups
    vl, rows = lanes(g, isa, wbits), int16_rows(g, wbits)
    o_pad = _ceil(g.o, vl * knobs.tile_o)
    x = te.placeholder(x_shape, io.in_dtype, name="x")
    w = te.placeholder((g.kh, g.kw, cg, o_pad), "int8", name="w")
    chan = te.placeholder((2, g.o), "float32", name="chan")
    q = te.placeholder((4,), "float32", name="q")

    a = te.compute((g.n, g.hp, g.wp, g.c), quantized_input(x, g, q, 255, "uint8"), name="a")
    ry, rx, rc = (te.reduce_axis((0, e), name) for e, name in ((rows or g.kh, "ry"), (g.kw, "rx"), (cg, "rc")))
    sh, sw = g.strides
    channel = (lambda o, c: te.min(o, g.o - 1)) if cg == 1 and og == 1 else (lambda o, c: te.min(o // og, g.groups - 1) * cg + c)
    if rows:    # int16 sums over chunks of `rows` kernel rows, then an int32 sum over the chunks
        chunks = _ceil(g.kh, rows) // rows
        def tap(n, h, w_, k, o):
            product = (a[n, h * sh + k * rows + ry, w_ * sw + rx, channel(o, rc)].astype("int16")
                       * w[k * rows + ry, rx, rc, o].astype("int16"))
            if g.kh % rows == 0:
                return product
            # rows past the kernel in a short last chunk (te.sum's `where` is lost in the PrimFunc)
            return tvm.tirx.if_then_else(k * rows + ry < g.kh, product, tvm.tirx.const(0, "int16"))
        part = te.compute((g.n, g.oh, g.ow, chunks, o_pad), lambda *i: te.sum(tap(*i), axis=[ry, rx, rc]), name="part")
        rk = te.reduce_axis((0, chunks), "rk")
        acc = te.compute((g.n, g.oh, g.ow, o_pad), lambda n, h, w_, o: te.sum(
            part[n, h, w_, rk, o].astype("int32"), axis=[rk]), name="acc")
    else:
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
    n, h, w_, o, *reduction = sch.get_loops(block)
    reduction = reduction if rows else [reduction[2], reduction[0], reduction[1]]   # channels (grouped) outermost
    wo, wi = sch.split(w_, [None, knobs.tile_w])
    oo, ob, oi = sch.split(o, [None, knobs.tile_o, vl])
    sch.reorder(n, h, wo, oo, *reduction, wi, ob, oi)
    anchor = sch.fuse(n, h, wo, oo)
    sch.parallel(anchor)      # accumulators on the stack: see conv._schedule_dot
    out_block = sch.get_sblock("out")
    sch.reverse_compute_at(out_block, anchor)
    _vectorize_inner(sch, out_block)
    if rows:
        part = sch.get_sblock("part")
        sch.compute_at(part, reduction[0])
        # compute_at made a loop per axis of extent > 1 in the block's axis order (n, h, w, k: one point here)
        own = iter(sch.get_loops(part)[2:])
        pw, po, pry, prx, prc = (next(own) if extent > 1 else None
                                 for extent in (knobs.tile_w, knobs.tile_o * vl, rows, g.kw, cg))
        pob, poi = sch.split(po, [knobs.tile_o, vl])
        present = lambda *loops: [loop for loop in loops if loop is not None]   # noqa: E731
        sch.reorder(*present(prc, pry, prx, pw, pob, poi))
        _tile_reduction(sch, part, present(prc, pry, prx) or [pob], present(pw, pob), poi)
        sch.unroll(reduction[0])      # the chunks: the short last one's missing rows are then dropped, not tested
    _tile_reduction(sch, block, reduction, [wi, ob], oi)
    return sch.mod["main"]


def _tile_reduction(sch: s_tir.Schedule, block, reduction: list, tile: list, lanes_loop) -> None:
    """Inner reduction loops (`reduction` is outermost first) and the register tile unrolled, the lanes
    vectorized, the accumulators zeroed before the outermost reduction loop."""
    for loop in (*reduction[1:], *tile):
        sch.unroll(loop)
    sch.vectorize(lanes_loop)
    init = sch.decompose_reduction(block, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])


def pack_grouped_weights(codes: np.ndarray, vl: int, knobs: Knobs) -> np.ndarray:
    """Codes [O, KH, KW, C/groups] -> [KH, KW, C/groups, O padded to whole tiles of `vl` lanes] int8."""
    o = codes.shape[0]
    padded = np.zeros((_ceil(o, vl * knobs.tile_o),) + codes.shape[1:], np.int8)
    padded[:o] = codes
    return np.ascontiguousarray(padded.transpose(1, 2, 3, 0))
