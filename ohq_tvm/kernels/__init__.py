"""Integer kernels for quantized layers: one parameterized template per arithmetic family.

| family     | configs             | arithmetic                                                  |
|------------|---------------------|-------------------------------------------------------------|
| dot        | W8A8, W4A8, W2A8    | u8 x s8 dot-4: vpdpbusd (AVX-512 VNNI), vpmaddubsw (AVX2),   |
|            |                     | widening multiply-add (NEON, generic); low-bit weights are   |
|            |                     | packed and unpacked in registers, and on AVX2 summed in      |
|            |                     | int16 over 4 channel quads before widening                   |
| bitserial  | W4A4, W2A2, W1A2,   | bit-planes, AND + popcount, shifts in the epilogue           |
|            | W1A1                |                                                              |
| grouped    | any wbits, A8       | depthwise / grouped: multiply-adds vectorized over channels, |
|            |                     | low-bit weights summed in int16 lanes over kernel rows       |
| FP32       | FP32                | MetaSchedule (ohq_tvm.tune), the fallback and the reference  |

Every kernel quantizes its float input itself and ends in the float epilogue (scale, bias with the
zero-point correction, clamp), so its measured time is what the layer costs in the network; between
two integer kernels (`Io`) the producer's epilogue quantizes for the consumer instead and the
activation crosses as uint8 codes, with no float round trip.
The scheme (symmetric per-channel weights, asymmetric per-tensor activations) is in `scheme`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

from ..layers import Layer
from . import bitserial, conv, grouped
from .conv import Geometry, Io, Knobs
from .isa import Isa, isa_of
from .scheme import CANDIDATES, ActQuant, Config, bias_correction, conv_reference, parse_config, quantize_weights

__all__ = ["CANDIDATES", "ActQuant", "Config", "Geometry", "Io", "Isa", "Knobs", "Packed", "build", "family",
           "isa_of", "knob_space", "ohwi", "pack", "pack_codes", "parse_config", "revision", "simulate"]


# A template's revision goes up when a change alters what it measures; tuning-log records of an older
# revision are measured again (records carry the revision; logs without one are revision 1). Variants with a
# history of their own have their own key: "dot-lowbit" (W4A8 / W2A8: int16 sums of channel quads on AVX2),
# "dot-weights-outer" (the other dot layers with Geometry.weights_outer), "grouped-lowbit" (2- and 4-bit
# weights: int16 sums over kernel rows). What changed at each bump is in this file's git history.
REVISIONS = {"dot": 2, "dot-weights-outer": 4, "dot-lowbit": 5, "bitserial": 3, "grouped": 3, "grouped-lowbit": 4}


def revision(layer: Layer, config: Config) -> int:
    kind = family(layer, config)
    if kind == "dot" and config.wbits < 8:
        kind = "dot-lowbit"
    elif kind == "dot" and Geometry.of(layer).weights_outer:
        kind = "dot-weights-outer"
    elif kind == "grouped" and grouped.int16_rows(Geometry.of(layer), config.wbits):
        kind = "grouped-lowbit"
    return REVISIONS[kind] if kind else 1


def family(layer: Layer, config: Config) -> str | None:
    """The template that implements `config` for `layer`, or None (FP32, or no integer kernel)."""
    if config.family == "fp32":
        return None
    if layer.groups > 1:
        return "grouped" if config.abits == 8 else None
    return "dot" if config.abits == 8 else "bitserial"


def knob_space(layer: Layer, config: Config, isa: Isa) -> list[Knobs]:
    g = Geometry.of(layer)
    return {"dot": lambda: conv.knob_space(g, isa),
            "bitserial": lambda: bitserial.knob_space(g, isa, config.abits, config.wbits),
            "grouped": lambda: grouped.knob_space(g, isa, config.wbits)}[family(layer, config)]()


def build(layer: Layer, config: Config, knobs: Knobs, target: tvm.target.Target, io: Io = Io()
          ) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc kernel(x, w, chan, q) -> out of `layer` at `config`."""
    g, isa = Geometry.of(layer), isa_of(target)
    kind = family(layer, config)
    if kind == "dot":
        return conv.dot_kernel(g, layer.input_shape, isa, knobs, config.wbits, io)
    if kind == "bitserial":
        return bitserial.bitserial_kernel(g, layer.input_shape, isa, knobs, config.abits, config.wbits, io)
    if kind == "grouped":
        return grouped.grouped_kernel(g, layer.input_shape, isa, knobs, io, config.wbits)
    raise ValueError(f"no integer kernel for {config.name} on {layer.id} ({layer.kind})")


@dataclass(frozen=True)
class Packed:
    """A layer's constant kernel arguments, plus what the float simulation needs."""
    w: np.ndarray          # packed weight codes, the template's layout
    chan: np.ndarray       # f32 [2, O]: scale, offset
    q: np.ndarray          # f32 [4]: 1/activation scale, zero point, clamp lo, clamp hi
    codes: np.ndarray      # signed weight codes [O, KH, KW, C/groups]
    act: ActQuant
    out_act: ActQuant | None = None    # the consumer's quantizer, folded into chan and the clamp (codes out)


def pack_codes(layer: Layer, config: Config, knobs: Knobs, isa: Isa, codes: np.ndarray) -> np.ndarray:
    """Signed weight codes [O, KH, KW, C/groups] -> the layout of `layer`'s kernel at `config`."""
    kind = family(layer, config)
    if kind == "dot":
        return conv.pack_dot_weights(codes, isa, knobs, config.wbits)
    if kind == "bitserial":
        return bitserial.pack_bitserial_weights(codes, isa, knobs, config.wbits)
    return grouped.pack_grouped_weights(codes, grouped.lanes(Geometry.of(layer), isa, config.wbits), knobs)


def ohwi(layer: Layer, weight: np.ndarray) -> np.ndarray:
    """The weight as the graph holds it -> [O, KH, KW, C/groups] (a matmul's [K, N] -> [N, 1, 1, K])."""
    return weight.T[:, None, None, :] if layer.op == "matmul" else weight


def pack(layer: Layer, config: Config, knobs: Knobs, isa: Isa, weight: np.ndarray, bias: np.ndarray | None,
         act: ActQuant, clamp: tuple[float, float] = (-np.inf, np.inf), out_act: ActQuant | None = None,
         input_mean: tuple[float, ...] | np.ndarray | None = None) -> Packed:
    """Quantize `weight` (the layer's float weight, as the graph holds it) and lay it out for the kernel.
    `out_act`: the consumer's input quantizer, when the kernel hands it codes (`Io.codes_out`): folded into
    the channel scale and offset, and the clamp becomes the code range (quantizing is monotonic).
    `input_mean`: per input channel, for the bias correction (scheme.py)."""
    codes, wscale = quantize_weights(ohwi(layer, weight), config.wbits,
                                     reduce_range=isa.reduce_range and family(layer, config) == "dot")
    o = codes.shape[0]
    scale = (np.float32(act.scale) * wscale).astype(np.float32)
    bias = np.zeros(o, np.float32) if bias is None else bias.astype(np.float32)
    if input_mean is not None:
        bias = bias + bias_correction(ohwi(layer, weight), codes * wscale[:, None, None, None], input_mean, layer.groups)
    offset = bias - scale * np.float32(act.zero_point) * codes.reshape(o, -1).sum(1).astype(np.float32)
    offset = offset.astype(np.float32)
    if out_act is not None:
        scale, offset = scale * out_act.inv_scale, offset * out_act.inv_scale + np.float32(out_act.zero_point)
        clamp = tuple(float(c) for c in out_act.quantize(np.array(clamp, np.float32)))   # +-inf: the code range
    w = pack_codes(layer, config, knobs, isa, codes)
    q = np.array([act.inv_scale, act.zero_point, clamp[0], clamp[1]], np.float32)
    return Packed(w, np.stack([scale, offset]), q, codes, act, out_act)


def simulate(layer: Layer, packed: Packed, x: np.ndarray) -> np.ndarray:
    """numpy model of the kernel: integer-exact core, then the same float32 epilogue (codes out: rounded)."""
    g = Geometry.of(layer)
    qa = packed.act.quantize(x).reshape(g.n, g.h, g.w, g.c)
    z = packed.act.zero_point
    # kernels accumulate sum qa * q (zero point included) and subtract z * sum q in the offset
    raw = conv_reference(qa, z, packed.codes, g.strides, g.padding, g.groups) \
        + z * packed.codes.reshape(len(packed.codes), -1).sum(1).astype(np.int64)
    # float64 then float32: the kernels' fused multiply-add rounds once
    y = (raw.astype(np.float32).astype(np.float64) * packed.chan[0] + packed.chan[1]).astype(np.float32)
    y = np.clip(y, packed.q[2], packed.q[3]).reshape(layer.output_shape)
    return np.rint(y).astype(np.uint8) if packed.out_act else y
