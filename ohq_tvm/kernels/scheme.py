"""The quantization scheme every kernel implements, with its numpy integer reference.

- Weights: symmetric, per output channel. b >= 2 bits: codes in [-(2^(b-1)-1), 2^(b-1)-1] (INT2 is
  ternary {-1, 0, 1}); 8 bits: scale = max|w| / qmax; 2 and 4 bits: scale = c * max|w| / qmax with
  the clipping ratio c (of a grid) that minimizes the channel's squared rounding error (rounding the
  largest weights exactly costs the many small ones their resolution). b = 1: bipolar codes {-1, +1},
  scale = mean|w| (the least-squares scale).
  On x86 without VNNI the 8-bit kernel multiplies with vpmaddubsw, whose int16 pair sums would
  saturate with full-range weights: there INT8 weights use 7 bits ([-63, 63]), like onnxruntime's
  reduce_range.
- Activations: asymmetric, per tensor. Codes in [0, 2^b - 1], zero point z = code of 0.0, so
  padding (value 0.0) is the code z and ReLU outputs have z = 0.
  q = clip(round_half_even(x * inv_scale) + z, 0, 2^b - 1), with inv_scale a float32.
- Integer core: acc[o] = sum (qa - z) * qw[o]; kernels compute sum qa * qw[o] and subtract the
  per-channel constant z * sum qw[o] (bit-serial kernels add the window-sum correction instead).
- Bias correction: rounding the weights shifts each output channel's mean by sum (w - q * sw) * E[x]; with
  the per-channel means of the layer's input from the calibration inputs, that shift is added back to the
  bias (data-free, as in Nagel et al. 2019; what it buys: `make bench-bias-correction`).
- Epilogue: y = clamp(acc * (sa * sw[o]) + bias[o], lo, hi) in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, order=True)
class Config:
    """A bit-width candidate for one layer."""
    wbits: int   # 32 = float
    abits: int

    @property
    def name(self) -> str:
        return "FP32" if self.wbits == 32 else f"W{self.wbits}A{self.abits}"

    @property
    def family(self) -> str:
        if self.wbits == 32:
            return "fp32"
        if self.abits == 8:
            return "int8" if self.wbits == 8 else "lowbit_weight"
        return "bitserial"


CANDIDATES = {c.name: c for c in (Config(32, 32), Config(8, 8), Config(4, 8), Config(2, 8),
                                  Config(4, 4), Config(2, 2), Config(1, 2), Config(1, 1))}


def parse_config(name: str) -> Config:
    try:
        return CANDIDATES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}") from None


def weight_qmax(bits: int, reduce_range: bool = False) -> int:
    if bits == 1:
        return 1
    return (2 ** (bits - 1) - 1) // (2 if reduce_range and bits == 8 else 1)


def weight_offset(wbits: int) -> tuple[int, int]:
    """(alpha, c) of the unsigned form u the low-bit kernels store a signed weight code q in: q = alpha * u - c
    (b >= 2 bits: alpha 1, c = 2^(b-1); bipolar b = 1: alpha 2, c = 1)."""
    return (2, 1) if wbits == 1 else (1, 1 << (wbits - 1))


def int16_products(wmax: int) -> int:
    """How many products of a uint8 activation code and a weight of magnitude <= wmax sum exactly in int16."""
    return 32767 // (255 * wmax)


CLIP_RATIOS = np.linspace(0.2, 1.0, 41, dtype=np.float32)


def quantize_weights(w: np.ndarray, bits: int, reduce_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """w [O, ...] float -> (int8 codes [O, ...], float32 scale [O])."""
    flat = w.reshape(w.shape[0], -1).astype(np.float32)
    if bits == 1:
        scale = np.maximum(np.abs(flat).mean(1), 1e-12)
        codes = np.where(flat >= 0, 1, -1)
    else:
        qmax = weight_qmax(bits, reduce_range)
        peak = np.maximum(np.abs(flat).max(1), 1e-12)
        scale, error = peak / qmax, np.full(len(flat), np.inf, np.float32)
        for ratio in CLIP_RATIOS if bits <= 4 else [1.0]:
            s = (peak * ratio / qmax)[:, None]
            e = np.square(np.clip(np.rint(flat / s), -qmax, qmax) * s - flat).sum(1)
            scale, error = np.where(e < error, s[:, 0], scale), np.minimum(e, error)
        codes = np.clip(np.rint(flat / scale[:, None]), -qmax, qmax)
    return codes.astype(np.int8).reshape(w.shape), scale.astype(np.float32)


def bias_correction(weight: np.ndarray, quantized: np.ndarray, input_mean: np.ndarray, groups: int = 1
                    ) -> np.ndarray:
    """The float32 [O] to add to the bias of a layer whose weight [O, KH, KW, C/groups] is quantized to
    `quantized` (codes x scales): sum (weight - quantized) * E[input channel] over each output's window."""
    error = (weight.astype(np.float64) - quantized.astype(np.float64)).sum(axis=(1, 2))
    o, per_group = error.shape
    mean = np.asarray(input_mean, np.float64).reshape(groups, per_group)[np.arange(o) // (o // groups)]
    return (error * mean).sum(1).astype(np.float32)


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor activation quantization: codes = clip(rint(x * inv_scale) + zero_point, 0, 2^bits-1)."""
    bits: int
    scale: float
    zero_point: int

    @classmethod
    def from_range(cls, lo: float, hi: float, bits: int) -> "ActQuant":
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)   # 0.0 must be exactly representable
        qmax = 2 ** bits - 1
        scale = max(hi - lo, 1e-8) / qmax
        return cls(bits, float(np.float32(scale)), int(np.clip(round(-lo / scale), 0, qmax)))

    @property
    def inv_scale(self) -> np.float32:
        return np.float32(1.0) / np.float32(self.scale)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        q = np.rint(x.astype(np.float32) * self.inv_scale) + self.zero_point
        return np.clip(q, 0, 2 ** self.bits - 1).astype(np.uint8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float32) - self.zero_point) * np.float32(self.scale)


def conv_reference(qa: np.ndarray, zero_point: int, qw: np.ndarray, strides=(1, 1), padding=(0, 0, 0, 0),
                   groups: int = 1) -> np.ndarray:
    """Integer conv: qa [N,H,W,C] codes, qw [O,KH,KW,C/groups] codes -> int64 sum (qa - z) * qw, NHWC."""
    a = qa.astype(np.int64) - zero_point
    top, left, bottom, right = padding
    a = np.pad(a, ((0, 0), (top, bottom), (left, right), (0, 0)))
    n, hp, wp, c = a.shape
    o, kh, kw, cg = qw.shape
    sh, sw = strides
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    og = o // groups
    out = np.zeros((n, oh, ow, o), np.int64)
    w = qw.astype(np.int64)
    for y in range(kh):
        for x in range(kw):
            window = a[:, y:y + sh * (oh - 1) + 1:sh, x:x + sw * (ow - 1) + 1:sw, :]
            for g in range(groups):
                out[..., g * og:(g + 1) * og] += np.einsum(
                    "nhwc,oc->nhwo", window[..., g * cg:(g + 1) * cg], w[g * og:(g + 1) * og, y, x, :])
    return out
