"""Bit-serial template for low-bit activations (A <= 2 bits typically): bit-planes and popcount.

codes a (abits, unsigned) and u (wbits, unsigned offset form of the signed weight codes):
    sum a * u = sum_{i,j} popcount(A_i & U_j) << (i + j)       A_i, U_j: bit-planes, 32 channels a word
signed weights q = alpha * u - c   (b >= 2: alpha 1, c = 2^(b-1); bipolar b = 1: alpha 2, c = 1), so
    sum a * q = alpha * sum a * u - c * S,   S = sum a over the window (the correction term)
and the zero-point term z * sum q[o] is folded into the per-channel offset like the 8-bit template.
Activations are quantized and bit-packed inside the kernel (spatial padding = code z, padded
channels = code 0); popcounts run vectorized over output channels (no horizontal reduction).
"""
from __future__ import annotations

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te

from .conv import Geometry, Io, Knobs, _ceil, epilogue_value, quantized_input
from .isa import Isa


def weight_offset(wbits: int) -> tuple[int, int]:
    """(alpha, c) with signed code q = alpha * u - c."""
    return (2, 1) if wbits == 1 else (1, 1 << (wbits - 1))


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

    x = te.placeholder(x_shape, io.in_dtype, name="x")
    w = te.placeholder((o_pad // (lanes * nb), g.kh, g.kw, wbits, words, nb * lanes), "uint32", name="w")
    chan = te.placeholder((2, g.o), "float32", name="chan")
    q = te.placeholder((4,), "float32", name="q")

    codes = te.compute((g.n, g.hp, g.wp, words * 32), quantized_input(x, g, q, 2 ** abits - 1, "uint32"), name="codes")
    t = te.reduce_axis((0, 32), "t")
    planes = te.compute((g.n, g.hp, g.wp, abits, words), lambda n, h, w_, i, cw: te.sum(
        ((codes[n, h, w_, cw * 32 + t] >> i.astype("uint32")) & tvm.tirx.const(1, "uint32")) << t.astype("uint32"),
        axis=t), name="planes")

    sh, sw = g.strides
    ry, rx, rw = te.reduce_axis((0, g.kh), "ry"), te.reduce_axis((0, g.kw), "rx"), te.reduce_axis((0, words), "rw")
    pairs = te.compute((g.n, g.oh, g.ow, abits, wbits, o_pad), lambda n, h, w_, i, j, o: te.sum(
        tvm.tirx.popcount(planes[n, h * sh + ry, w_ * sw + rx, i, rw]
                          & w[o // (lanes * nb), ry, rx, j, rw, o % (lanes * nb)]).astype("int32"),
        axis=[ry, rx, rw]), name="pairs")
    sy, sx, sc = te.reduce_axis((0, g.kh), "sy"), te.reduce_axis((0, g.kw), "sx"), te.reduce_axis((0, words * 32), "sc")
    window = te.compute((g.n, g.oh, g.ow), lambda n, h, w_: te.sum(
        codes[n, h * sh + sy, w_ * sw + sx, sc].astype("int32"), axis=[sy, sx, sc]), name="window")

    ri, rj = te.reduce_axis((0, abits), "ri"), te.reduce_axis((0, wbits), "rj")
    dot = te.compute((g.n, g.oh, g.ow, o_pad), lambda n, h, w_, o: te.sum(
        pairs[n, h, w_, ri, rj, o] << (ri + rj), axis=[ri, rj]), name="dot")
    image = len(x_shape) == 4
    out_shape = (g.n, g.oh, g.ow, g.o) if image else (g.ow, g.o)

    def epilogue(*idx):
        n, h, w_, o = idx if image else (0, 0, idx[0], idx[1])
        acc = dot[n, h, w_, o] * alpha - window[n, h, w_] * offset
        return epilogue_value(acc.astype("float32") * chan[0, o] + chan[1, o], q, io)
    out = te.compute(out_shape, epilogue, name="out")
    return _schedule(te.create_prim_func([x, w, chan, q, out]), isa, knobs, abits, wbits)


def _schedule(func: tvm.tirx.PrimFunc, isa: Isa, knobs: Knobs, abits: int, wbits: int) -> tvm.tirx.PrimFunc:
    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("codes"))
    planes = sch.get_sblock("planes")
    pl = sch.get_loops(planes)
    sch.parallel(sch.fuse(pl[0], pl[1]))
    window = sch.get_sblock("window")
    sch.parallel(sch.fuse(*sch.get_loops(window)[:2]))
    pairs = sch.get_sblock("pairs")
    n, h, w, i, j, o, ry, rx, rw = sch.get_loops(pairs)
    wo, wi = sch.split(w, [None, knobs.tile_w])
    oo, ob, oi = sch.split(o, [None, knobs.tile_o, isa.lanes])
    sch.reorder(n, h, wo, oo, ry, rx, rw, i, j, wi, ob, oi)
    sch.parallel(sch.fuse(n, h, wo, oo))
    sch.set_scope(pairs, 0, "local")
    sch.reverse_compute_at(sch.get_sblock("dot"), sch.get_loops(pairs)[0])
    for loop in (i, j, wi, ob):
        sch.unroll(loop)
    sch.vectorize(oi)                       # before decompose_reduction, which would block it
    init = sch.decompose_reduction(pairs, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    out_loops = sch.get_loops(sch.get_sblock("out"))   # after `window`, which the tiles do not cover
    sch.parallel(out_loops[0] if len(out_loops) == 2 else sch.fuse(*out_loops[:2]))
    sch.vectorize(out_loops[-1])
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
