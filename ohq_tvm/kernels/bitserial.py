"""Bit-serial template for low-bit activations (A <= 2 bits typically): bit-planes and popcount.

codes a (abits, unsigned) and u (wbits, unsigned offset form of the signed weight codes):
    sum a * u = sum_{i,j} popcount(A_i & U_j) << (i + j)       A_i, U_j: bit-planes, 32 channels a word
signed weights q = alpha * u - c   (b >= 2: alpha 1, c = 2^(b-1); bipolar b = 1: alpha 2, c = 1), so
    sum a * q = alpha * sum a * u - c * S,   S = sum a over the window (the correction term)
and the zero-point term z * sum q[o] is folded into the per-channel offset like the 8-bit template.
S adds up per-pixel code sums, which are popcounts of the planes too. Activations are quantized once
(or arrive as codes) and bit-packed inside the kernel (spatial padding = code z, padded channels =
code 0); popcounts run vectorized over output channels (no horizontal reduction), each (i, j) pair
in its own accumulator, shifted once per output.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te

from .conv import Geometry, Io, Knobs, _ceil, _input_view, epilogue_value, quantized_input, schedule_elementwise
from .isa import Isa
from .scheme import weight_offset


def knob_space(g: Geometry, isa: Isa, abits: int, wbits: int) -> list[Knobs]:
    blocks = _ceil(g.o, isa.lanes) // isa.lanes
    tiles = [Knobs(tw, nb) for tw in range(1, min(g.ow, 16) + 1) for nb in (1, 2, 4, 8)
             if blocks % nb == 0 and g.ow % tw == 0 and 2 <= abits * wbits * tw * nb <= isa.registers - 3]
    tiles.sort(key=lambda k: (-(k.tile_w * k.tile_o), -k.tile_o))
    return tiles[:6] or [Knobs(1, 1)]


def bitserial_kernel(g: Geometry, x_shape: tuple[int, ...], isa: Isa, knobs: Knobs, abits: int, wbits: int,
                     io: Io = Io()) -> tvm.tirx.PrimFunc:
    assert g.groups == 1
    lanes, nb = isa.lanes, knobs.tile_o
    words = _ceil(g.c, 32) // 32
    o_pad = _ceil(g.o, lanes * nb)
    alpha, offset = weight_offset(wbits)
    u32 = lambda v: tvm.tirx.const(v, "uint32")   # noqa: E731

    x = te.placeholder(x_shape, io.in_dtype, name="x")
    w = te.placeholder((o_pad // (lanes * nb), g.kh, g.kw, wbits, words, nb * lanes), "uint32", name="w")
    chan = te.placeholder((2, g.o), "float32", name="chan")
    q = te.placeholder((4,), "float32", name="q")

    if io.codes_in:
        codes = _input_view(x, g)
    else:   # quantized once, unpadded: the planes add the padding
        a = te.compute((g.n, g.h, g.w, g.c), quantized_input(x, replace(g, padding=(0, 0, 0, 0)), q, 2 ** abits - 1,
                                                              "uint8"), name="a")
        codes = lambda n, h, w_, c: a[n, h, w_, c]   # noqa: E731
    top, left = g.padding[0], g.padding[1]

    def plane(n, h, w_, i, cw):
        """Bit i of 32 channels' codes. The OR is written out (not a reduction) and padding is decided once per
        word, so LLVM vectorizes the shifts. Spatial padding is the zero point's code, padded channels code 0."""
        tail = g.c % 32                           # channels in a partial last word
        word = u32(0)
        for t in range(32):
            c = cw * 32 + t if not tail or t < tail else te.min(cw * 32 + t, g.c - 1)
            code = codes(n, te.max(h - top, 0), te.max(w_ - left, 0), c).astype("uint32")
            bit = ((code >> i.astype("uint32")) & u32(1)) << u32(t)
            word = word | (tvm.tirx.if_then_else(cw < words - 1, bit, u32(0)) if tail and t >= tail else bit)
        valid = u32(0xFFFFFFFF) if not tail else tvm.tirx.if_then_else(cw < words - 1, u32(0xFFFFFFFF),
                                                                       u32((1 << tail) - 1))
        z_bit = (q[1].astype("uint32") >> i.astype("uint32")) & u32(1)
        padded = tvm.tirx.if_then_else(z_bit == u32(1), valid, u32(0))
        inside = tvm.tirx.all(h >= top, h < g.h + top, w_ >= left, w_ < g.w + left)
        return tvm.tirx.if_then_else(inside, word, padded) if any(g.padding) else word
    planes = te.compute((g.n, g.hp, g.wp, abits, words), plane, name="planes")
    # sum a over each window (the signed-weight correction) from per-pixel code sums, which are popcounts
    rw = te.reduce_axis((0, words), "rw")
    pixel_sum = te.compute((g.n, g.hp, g.wp), lambda n, h, w_: te.sum(sum(
        tvm.tirx.popcount(planes[n, h, w_, i, rw]).astype("int32") << i for i in range(abits)), axis=rw),
        name="pixel_sum")
    sh, sw = g.strides
    window = te.compute((g.n, g.oh, g.ow), lambda n, h, w_: sum(
        pixel_sum[n, h * sh + y, w_ * sw + xx] for y in range(g.kh) for xx in range(g.kw)), name="window")

    ry, rx, rc = te.reduce_axis((0, g.kh), "ry"), te.reduce_axis((0, g.kw), "rx"), te.reduce_axis((0, words), "rc")
    pairs = te.compute((g.n, g.oh, g.ow, abits, wbits, o_pad), lambda n, h, w_, i, j, o: te.sum(
        tvm.tirx.popcount(planes[n, h * sh + ry, w_ * sw + rx, i, rc]
                          & w[o // (lanes * nb), ry, rx, j, rc, o % (lanes * nb)]).astype("int32"),
        axis=[ry, rx, rc]), name="pairs")
    image = len(x_shape) == 4
    out_shape = (g.n, g.oh, g.ow, g.o) if image else (g.ow, g.o)

    ri, rj = te.reduce_axis((0, abits), "ri"), te.reduce_axis((0, wbits), "rj")   # a reduction: see _schedule
    dot = te.compute((g.n, g.oh, g.ow, o_pad), lambda n, h, w_, o: te.sum(
        pairs[n, h, w_, ri, rj, o] << (ri + rj), axis=[ri, rj]), name="dot")

    def epilogue(*idx):
        n, h, w_, o = idx if image else (0, 0, idx[0], idx[1])
        acc = dot[n, h, w_, o] * alpha - window[n, h, w_] * offset
        return epilogue_value(acc.astype("float32") * chan[0, o] + chan[1, o], q, io)
    out = te.compute(out_shape, epilogue, name="out")
    return _schedule(te.create_prim_func([x, w, chan, q, out]), isa, knobs)


def _schedule(func: tvm.tirx.PrimFunc, isa: Isa, knobs: Knobs) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    blocks = {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "a" in blocks:
        schedule_elementwise(sch, blocks["a"])
    for name in ("planes", "pixel_sum"):
        loops = sch.get_loops(blocks[name])
        sch.parallel(sch.fuse(loops[0], loops[1]))
    sch.unroll(sch.get_loops(blocks["planes"])[2])      # the bit-plane loop
    pairs = blocks["pairs"]
    n, h, w, i, j, o, ry, rx, rc = sch.get_loops(pairs)
    wo, wi = sch.split(w, [None, knobs.tile_w])
    oo, ob, oi = sch.split(o, [None, knobs.tile_o, isa.lanes])
    sch.reorder(n, h, wo, oo, ry, rx, rc, i, j, wi, ob, oi)
    sch.parallel(sch.fuse(n, h, wo, oo))      # plane-pair sums on the stack: see conv._schedule_dot
    sch.reverse_compute_at(blocks["dot"], sch.get_loops(pairs)[0], preserve_unit_loops=True)
    *_, do, dri, drj = sch.get_loops(blocks["dot"])
    sch.reorder(dri, drj, do)              # reduction outside, so the channels vectorize
    sch.vectorize(do)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(blocks["dot"], dri))[-1])
    sch.compute_inline(blocks["window"])
    out_loops = sch.get_loops(blocks["out"])
    sch.parallel(out_loops[0] if len(out_loops) == 2 else sch.fuse(*out_loops[:2]))
    sch.vectorize(out_loops[-1])
    for loop in (i, j, wi, ob):
        sch.unroll(loop)
    sch.vectorize(oi)                       # before decompose_reduction, which would block it
    init = sch.decompose_reduction(pairs, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]


def pack_bitserial_weights(codes: np.ndarray, isa: Isa, knobs: Knobs, wbits: int) -> np.ndarray:
    """Signed codes [O, KH, KW, C] -> unsigned offset bit-planes [O/(lanes*nb), KH, KW, wbits, C/32, nb*lanes]."""
    alpha, offset = weight_offset(wbits)
    o, kh, kw, c = codes.shape
    o_pad, words = _ceil(o, isa.lanes * knobs.tile_o), _ceil(c, 32) // 32
    u = np.zeros((o_pad, kh, kw, words * 32), np.uint64)
    u[:o, :, :, :c] = (codes.astype(np.int64) + offset) // alpha
    bits = (u[..., None, :] >> np.arange(wbits, dtype=np.uint64)[:, None]) & 1        # [O, KH, KW, wbits, C]
    words_ = (bits.reshape(o_pad, kh, kw, wbits, words, 32) << np.arange(32, dtype=np.uint64)).sum(-1)
    tile = isa.lanes * knobs.tile_o
    return np.ascontiguousarray(words_.astype(np.uint32).reshape(o_pad // tile, tile, kh, kw, wbits, words)
                                .transpose(0, 2, 3, 4, 5, 1))
