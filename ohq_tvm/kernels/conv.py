"""One template for 8-bit-activation integer layers: quantize input -> u8 x s8 dot -> float epilogue.

A layer (conv2d NHWC/OHWI, or matmul seen as a 1x1 conv over rows) becomes one PrimFunc

    out = kernel(x: f32 [input shape], w: packed codes, chan: f32 [2, O], q: f32 [4])

with chan = (scale, offset) per output channel (offset folds bias and the zero-point correction)
and q = (1/activation scale, zero point, clamp lo, clamp hi), so identical shapes share a kernel.
Between two integer kernels the activation stays integer (`Io`): the producer's epilogue rounds to
the consumer's codes (its quantizer folded into chan and the clamp), which the consumer takes as x.
Weights with fewer than 8 bits are packed several to a byte and unpacked in registers
(`wbits`); the arithmetic is the same dot product, so it is one template for W8A8, W4A8, W2A8.
Low-bit weights are stored offset-coded (w + 2^(wbits-1), or the bit of a bipolar +-1), so unpacking
is a shift and a mask; the accumulators start at -offset * (sum of the input codes in the window):
per-pixel channel sums, then window sums, a small fraction of the layer's work.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
import tvm.s_tir as s_tir
from tvm import te

from ..layers import Layer
from .isa import Isa
from .scheme import weight_offset


@dataclass(frozen=True)
class Geometry:
    """A layer as an NHWC convolution; a matmul [M, K] x [K, N] is a 1x1 conv over a 1 x M image."""
    n: int
    h: int
    w: int
    c: int
    o: int
    kh: int
    kw: int
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]   # top, left, bottom, right
    groups: int

    @property
    def hp(self) -> int:
        """Padded input height."""
        return self.h + self.padding[0] + self.padding[2]

    @property
    def wp(self) -> int:
        return self.w + self.padding[1] + self.padding[3]

    @property
    def oh(self) -> int:
        return (self.hp - self.kh) // self.strides[0] + 1

    @property
    def ow(self) -> int:
        return (self.wp - self.kw) // self.strides[1] + 1

    @property
    def weights_outer(self) -> bool:
        """More weights than input pixels to reuse them on (a multi-row matmul, a late narrow conv): the loop
        over weight panels goes outermost, so every pixel reuses a panel from cache instead of streaming the
        weights again for each output row (ResNet-18's 7x7x512 3x3 conv reads 2.4 MB of weights)."""
        return self.o * self.kh * self.kw > self.n * self.h * self.w > 1

    @classmethod
    def of(cls, layer: Layer) -> "Geometry":
        if layer.op == "matmul":
            m = int(np.prod(layer.input_shape[:-1]))
            return cls(1, 1, m, layer.weight_shape[0], layer.weight_shape[1], 1, 1, (1, 1), (0, 0, 0, 0), 1)
        n, h, w, c = layer.input_shape
        o, kh, kw, _ = layer.weight_shape
        return cls(n, h, w, c, o, kh, kw, tuple(layer.strides), tuple(layer.padding), layer.groups)


@dataclass(frozen=True)
class Io:
    """How a kernel meets its neighbours: float tensors, or the activation codes integer kernels pass on."""
    codes_in: bool = False   # x holds this layer's uint8 input codes (its producer quantized them)
    codes_out: bool = False  # out holds the consumer's uint8 input codes (its quantizer folded in by `pack`)

    @classmethod
    def of(cls, layer: Layer) -> "Io":
        """The form `layer` takes in its network when its neighbours are quantized too (what OQA times)."""
        return cls(layer.codes_in, layer.codes_out)

    @property
    def in_dtype(self) -> str:
        return "uint8" if self.codes_in else "float32"

    @property
    def out_dtype(self) -> str:
        return "uint8" if self.codes_out else "float32"


@dataclass(frozen=True)
class Knobs:
    tile_w: int     # output pixels per register tile
    tile_o: int     # vector registers of output channels per tile (NB)


def _ceil(a: int, b: int) -> int:
    return -(-a // b) * b


def knob_space(g: Geometry, isa: Isa) -> list[Knobs]:
    """Register tiles that fit the register file, widest first; bounded (<= 6) so search stays cheap."""
    blocks = _ceil(g.o, isa.lanes) // isa.lanes
    tiles = [Knobs(tw, nb) for tw in range(1, min(g.ow, 16) + 1) for nb in (1, 2, 3, 4, 6, 8)
             if blocks % nb == 0 and g.ow % tw == 0 and 4 <= tw * nb + nb <= isa.registers - 2
             or (tw == 1 and nb == 1)]
    tiles.sort(key=lambda k: (-(k.tile_w * k.tile_o), -k.tile_o))
    return tiles[:6]


def quantized_input(x: te.Tensor, g: Geometry, q: te.Tensor, qmax: int, dtype: str):
    """(n, h, w, c) of the padded NHWC image -> activation code, for every template's input stage.

    Spatial padding is the code of 0.0 (the zero point q[1]); channels padded beyond g.c are code 0,
    so they add nothing whatever their (e.g. bipolar) weight. A uint8 x already holds the codes.
    """
    view, top, left = _input_view(x, g), g.padding[0], g.padding[1]

    def code(n, h, w, c):
        inside = tvm.tirx.all(h >= top, h < g.h + top, w >= left, w < g.w + left)
        if x.dtype == "uint8":
            value = tvm.tirx.if_then_else(inside, view(n, h - top, w - left, c).astype(dtype), q[1].astype(dtype))
            return tvm.tirx.if_then_else(c < g.c, value, tvm.tirx.const(0, dtype))
        value = te.max(te.min(te.round(view(n, h - top, w - left, c) * q[0]) + q[1], float(qmax)), 0.0)
        value = tvm.tirx.if_then_else(inside, value, q[1])
        return tvm.tirx.if_then_else(c < g.c, value, 0.0).astype(dtype)
    return code


def epilogue_value(y, q: te.Tensor, io: Io):
    """The epilogue's clamp; for codes out (consumer's quantizer folded in by `pack`), rounded to codes."""
    y = te.max(te.min(y, q[3]), q[2])
    # nearbyint, and through int32: te.round or a float -> uint8 cast here would not vectorize
    return tvm.tirx.nearbyint(y).astype("int32").astype("uint8") if io.codes_out else y


def _input_view(x: te.Tensor, g: Geometry):
    """x in its own shape -> accessor (n, h, w, c) of the NHWC image the kernel sees."""
    if len(x.shape) == 4:
        return lambda n, h, w, c: x[n, h, w, c]
    return lambda n, h, w, c: x[w, c]


def dot_kernel(g: Geometry, x_shape: tuple[int, ...], isa: Isa, knobs: Knobs, wbits: int = 8, io: Io = Io()
               ) -> tvm.tirx.PrimFunc:
    """Quantize (8-bit activations) + dense conv / matmul with a u8 x s8 dot-4 inner product."""
    assert g.groups == 1
    lanes, nb = isa.lanes, knobs.tile_o
    per = 8 // wbits                                    # weight codes per byte (along channel blocks)
    c4 = _ceil(g.c, 4 * per)
    o_pad = _ceil(g.o, lanes * nb)

    x = te.placeholder(x_shape, io.in_dtype, name="x")
    w_dtype = "int8" if wbits == 8 else "uint8"
    w = te.placeholder((o_pad // (lanes * nb), g.kh, g.kw, c4 // (4 * per), nb, lanes, 4), w_dtype, name="w")
    chan = te.placeholder((2, g.o), "float32", name="chan")
    q = te.placeholder((4,), "float32", name="q")

    if io.codes_in and g.hp == g.h and g.wp == g.w and c4 == g.c:
        a = _input_view(x, g)       # the codes as they come: no padding to add, no copy
    else:
        codes = te.compute((g.n, g.hp, g.wp, c4), quantized_input(x, g, q, 255, "uint8"), name="a")
        a = lambda n, h, w_, c: codes[n, h, w_, c]   # noqa: E731

    sh, sw = g.strides
    quads = int16_quads(g, isa, wbits)
    tile = lanes * nb
    if wbits == 8:
        def weight(o, y, xx, c):
            return w[o // tile, y, xx, c // 4, (o // lanes) % nb, o % lanes, c % 4]
    else:
        mask = tvm.tirx.const((1 << wbits) - 1, "uint8")
        alpha, offset = weight_offset(wbits)     # stored u, weight alpha * u - offset

        def unpack(ob, y, xx, cq, j, quad, i, k):
            cb = cq * quads + quad
            v = ((w[ob, y, xx, cb // per, j, i, k] >> ((cb % per) * wbits).astype("uint8")) & mask).astype("int8")
            return v + v if alpha == 2 else v
        # laid out for the intrinsic: the `quads` channel quads one call reads are adjacent per lane block
        wu = te.compute((o_pad // tile, g.kh, g.kw, c4 // (4 * quads), nb, quads, lanes, 4), unpack, name="wu")

        def weight(o, y, xx, c):
            return wu[o // tile, y, xx, c // (4 * quads), (o // lanes) % nb, (c // 4) % quads, o % lanes, c % 4]
        sc = te.reduce_axis((0, c4), "sc")
        csum = te.compute((g.n, g.hp, g.wp), lambda n, h, w_: te.sum(a(n, h, w_, sc).astype("int32"), axis=sc),
                          name="csum")      # per input pixel, then summed over the window
        sy, sx = te.reduce_axis((0, g.kh), "sy"), te.reduce_axis((0, g.kw), "sx")
        start = te.compute((g.n, g.oh, g.ow), lambda n, h, w_: te.sum(
            csum[n, h * sh + sy, w_ * sw + sx] * -offset, axis=[sy, sx]), name="start")

    ry, rx, rc = te.reduce_axis((0, g.kh), "ry"), te.reduce_axis((0, g.kw), "rx"), te.reduce_axis((0, c4), "rc")
    acc = te.compute((g.n, g.oh, g.ow, o_pad), lambda n, h, w_, o: te.sum(
        a(n, h * sh + ry, w_ * sw + rx, rc).astype("int32") * weight(o, ry, rx, rc).astype("int32"),
        axis=[ry, rx, rc], init=None if wbits == 8 else start[n, h, w_]), name="acc")
    out_shape = (g.n, g.oh, g.ow, g.o) if len(x_shape) == 4 else (g.ow, g.o)
    out_index = (lambda n, h, w_, o: (n, h, w_, o)) if len(x_shape) == 4 else (lambda m, o: (0, 0, m, o))

    def epilogue(*idx):
        n, h, w_, o = out_index(*idx)
        return epilogue_value(acc[n, h, w_, o].astype("float32") * chan[0, o] + chan[1, o], q, io)
    out = te.compute(out_shape, epilogue, name="out")
    return _schedule_dot(te.create_prim_func([x, w, chan, q, out]), isa, knobs, wbits, g.weights_outer, quads)


def int16_quads(g: Geometry, isa: Isa, wbits: int) -> int:
    """Channel quads per dot intrinsic call: > 1 where low-bit weights let AVX2 add several vpmaddubsw
    results in int16 before widening them (vpmaddwd + vpaddd), which is what makes W4A8 / W2A8 faster than
    W8A8 there (Zen 3: 3.25 instead of 4 vector uops per 32 multiply-adds). A power of two, at least the
    codes per byte (one byte load unpacks whole quads), dividing the padded channels; at most 4 (8 measured
    slower for W2A8: more registers for a smaller saving)."""
    per = 8 // wbits
    alpha = weight_offset(wbits)[0]
    bound = min(isa.int16_quads(alpha * ((1 << wbits) - 1)), 4) if wbits < 8 else 1
    if bound < per:
        return 1
    c4, quads = _ceil(g.c, 4 * per), per
    while 2 * quads <= bound and c4 % (8 * quads) == 0:
        quads *= 2
    return quads


def _schedule_dot(func: tvm.tirx.PrimFunc, isa: Isa, knobs: Knobs, wbits: int, weights_outer: bool,
                  quads: int) -> tvm.tirx.PrimFunc:
    unpack = wbits != 8
    sch = s_tir.Schedule(func)
    roots = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if "a" in roots:
        schedule_elementwise(sch, sch.get_sblock("a"))
    for name in ("csum", "start"):     # offset correction: per-pixel sums of the input codes
        if name in roots:
            sch.parallel(sch.fuse(*sch.get_loops(sch.get_sblock(name))[:2]))
    acc = sch.get_sblock("acc")
    n, h, w, o, ry, rx, rc = sch.get_loops(acc)
    wo, wi = sch.split(w, [None, knobs.tile_w])
    oo, ob, oi = sch.split(o, [None, knobs.tile_o, isa.lanes])
    per = 8 // wbits
    spatial = (oo, n, h, wo) if weights_outer else (n, h, wo, oo)
    if quads > 1:   # one intrinsic call per tile vector covers rcm: the quads
        rco, rcm, rci = sch.split(rc, [None, quads, 4])
        sch.reorder(*spatial, ry, rx, rco, wi, ob, rcm, oi, rci)
    else:
        rco, rcm, rci = sch.split(rc, [None, per, 4])          # rcm: the channel blocks sharing a byte
        sch.reorder(*spatial, ry, rx, rco, rcm, wi, ob, oi, rci)
    # The accumulator tile (and unpacked weights) keep the default "global" scope: TVM puts a global
    # allocation under 1 KB (kMaxStackAlloca) inside the parallel loop on the stack, where LLVM keeps it
    # in registers; a "local" one costs a TVMBackendAllocWorkspace call per tile (half the time of a
    # 16-channel 1x1 conv). Larger tiles get the workspace call either way.
    sch.parallel(sch.fuse(*spatial))
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, sch.get_loops(acc)[0])
    _vectorize_inner(sch, out)
    if unpack:   # unpack the tile's weights next to their use (one byte load serves `per` blocks)
        wu = sch.get_sblock("wu")
        sch.compute_at(wu, rco)
        wl = sch.get_loops(wu)
        sch.vectorize(sch.fuse(wl[-2], wl[-1]))
    intrin = isa.intrinsic(quads)
    for loop in (rcm, wi, ob) if quads == 1 else (wi, ob):
        sch.unroll(loop)
    if intrin is None:      # vectorize before decompose_reduction, which would block it
        sch.vectorize(oi)
        sch.unroll(rci)
    init = sch.decompose_reduction(acc, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    if intrin:
        sch.tensorize(oi if quads == 1 else rcm, intrin)
    if unpack:   # accumulators start at the offset correction (the last primitive: see _starts_at)
        _starts_at(sch, init, "start")
    return sch.mod["main"]


def _starts_at(sch: s_tir.Schedule, init, buffer: str) -> None:
    """Make a reduction's init block store `buffer`[its leading spatial indices] instead of zero: the
    reduction's TE init, which te.create_prim_func drops (TVM 0.27). The schedule's dependency analysis
    does not see the new read, so `buffer` must stay a root stage ahead of the reduction (it is, in TE
    order) and no dependency-checked primitive may follow."""
    block = sch.get(init)
    buf = next(b for b in sch.get(sch.get_sblock("root")).alloc_buffers if b.name == buffer)
    index = [iv.var for iv in block.iter_vars[:len(buf.shape)]]
    region = tvm.tirx.BufferRegion(buf, [tvm.ir.Range.from_min_extent(v, 1) for v in index])
    body = tvm.tirx.BufferStore(block.body.buffer, tvm.tirx.BufferLoad(buf, index), block.body.indices)
    new = s_tir.SBlock(block.iter_vars, [region], block.writes, block.name_hint, body, None,
                       block.alloc_buffers, block.match_buffers, block.annotations)
    sch.state.replace(sch.get_sref(init), new, {block: new})


def pack_dot_weights(codes: np.ndarray, isa: Isa, knobs: Knobs, wbits: int = 8) -> np.ndarray:
    """Codes [O, KH, KW, C] (signed; +-1 for 1 bit) -> the template's weight layout.

    Output channels are padded to whole register tiles and input channels to 4 * codes-per-byte,
    with zero codes (any padded weight meets a zero activation code: see quantized_input).
    Below 8 bits the codes are stored offset-coded, unsigned, several to a byte.
    """
    lanes, nb, per = isa.lanes, knobs.tile_o, 8 // wbits
    o, kh, kw, c = codes.shape
    o_pad, c_pad = _ceil(o, lanes * nb), _ceil(c, 4 * per)
    padded = np.zeros((o_pad, kh, kw, c_pad), np.int8)
    padded[:o, :, :, :c] = codes
    tiled = padded.reshape(o_pad // (lanes * nb), nb, lanes, kh, kw, c_pad // (4 * per), per, 4)
    tiled = tiled.transpose(0, 3, 4, 5, 6, 1, 2, 7)            # [ob, kh, kw, cb, per, nb, lanes, 4]
    if wbits == 8:
        return np.ascontiguousarray(tiled.reshape(tiled.shape[:3] + (-1,) + tiled.shape[5:]))
    alpha, offset = weight_offset(wbits)
    bits = (tiled + offset) // alpha
    packed = np.zeros(tiled.shape[:4] + tiled.shape[5:], np.uint8)
    for p in range(per):
        packed |= (bits[:, :, :, :, p].astype(np.uint8) << (p * wbits)).astype(np.uint8)
    return packed


def _vectorize_inner(sch: s_tir.Schedule, block) -> None:
    """Vectorize a computed-at epilogue's innermost loop, unless unit extents left it only the anchor loop."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.vectorize(loops[-1])


def schedule_elementwise(sch: s_tir.Schedule, block) -> None:
    """A root elementwise stage (e.g. the input quantization): parallel rows, vectorized channels."""
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops[:2]))
    extent = int(sch.get(loops[-1]).extent)
    lanes = next((v for v in (32, 16, 8, 4) if extent % v == 0), None)
    if lanes:
        sch.vectorize(sch.split(loops[-1], [None, lanes])[1])
