"""The vector ISA a target offers the integer kernels, and its u8 x s8 dot-product tensor intrinsics.

Each intrinsic computes C[i] += sum_k A[k] * B[i, k] for `lanes` int32 lanes and k < 4
(A: 4 uint8 activations broadcast to every lane, B: int8 weights [lanes, 4]).
- avx512-vnni: vpdpbusd, 16 lanes.
- avx2: vpmaddubsw + vpmaddwd, 8 lanes. vpmaddubsw saturates int16 pair sums, hence 7-bit
  weights on this path (see scheme.py). Low-bit weights leave int16 headroom: there one call covers
  several channel quads, adding their vpmaddubsw pair sums in int16 and widening once (`int16_quads`).
- generic (ARM NEON, plain x86): no intrinsic; LLVM vectorizes the widening multiply-adds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import tvm
import tvm.s_tir as s_tir
from tvm.script import tirx as T
from tvm.target import codegen

from .scheme import int16_products


@dataclass(frozen=True)
class Isa:
    name: str           # "avx512-vnni" | "avx2" | "generic"
    lanes: int          # int32 accumulator lanes of one vector register
    registers: int      # vector registers, bounds the register tile
    reduce_range: bool  # 7-bit INT8 weights (vpmaddubsw saturation)

    def intrinsic(self, quads: int = 1) -> str | None:
        """The dot intrinsic over `quads` channel quads: C[i] += sum_k A[k] * B[k // 4, i, k % 4], k < 4 * quads."""
        return None if self.name == "generic" else _register(self.name, self.lanes, quads)

    def int16_quads(self, wmax: int) -> int:
        """Channel quads whose vpmaddubsw pair sums (2 * 255 * wmax at most) add up in int16 (AVX2 only)."""
        return max(1, int16_products(wmax) // 2) if self.name == "avx2" else 1


def isa_of(target: tvm.target.Target) -> Isa:
    features = codegen.llvm_get_cpu_features(target)
    if "avx512vnni" in features and "avx512bw" in features:
        return Isa("avx512-vnni", 16, 32, False)
    if "avx2" in features:
        return Isa("avx2", 8, 16, True)
    return Isa("generic", 4, 32 if "aarch64" in str(target.attrs.get("mtriple", "")) else 16, False)


def _broadcast_quad(A, quad, lanes):
    return T.reinterpret(T.broadcast(T.reinterpret(A.vload([4 * quad], "uint8x4"), dtype="int32"), lanes),
                         dtype=f"int8x{4 * lanes}")


def _vnni_impl(A, B, C, lanes, quads):
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                                   C.vload([0], "int32x16"), _broadcast_quad(A, 0, lanes), B.vload([0, 0], "int8x64"),
                                   dtype="int32x16")


def _avx2_impl(A, B, C, lanes, quads):
    def pairs(quad):
        b = B.vload([0, 0], "int8x32") if quads == 1 else B.vload([quad, 0, 0], "int8x32")
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                       _broadcast_quad(A, quad, lanes), b, dtype="int16x16")
    total = pairs(0)
    for quad in range(1, quads):
        total = total + pairs(quad)
    widened = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                      total, T.broadcast(T.int16(1), 16), dtype="int32x8")
    return C.vload([0], "int32x8") + widened


_IMPLS = {"avx512-vnni": _vnni_impl, "avx2": _avx2_impl}


@cache
def _register(isa: str, lanes: int, quads: int) -> str:
    if quads == 1:
        @T.prim_func(s_tir=True)
        def desc(A: T.Buffer((4,), "uint8", offset_factor=1),
                 B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                 C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                for i, k in T.grid(lanes, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
        b_shape = (lanes, 4)
    else:   # B: the quads' [lanes, 4] weight blocks, adjacent; one reduction axis over the 4 * quads channels
        @T.prim_func(s_tir=True)
        def desc(A: T.Buffer((4 * quads,), "uint8", offset_factor=1),
                 B: T.Buffer((quads, lanes, 4), "int8", offset_factor=1),
                 C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4 * quads], B[0:quads, 0:lanes, 0:4])
                T.writes(C[0:lanes])
                for g, i, k in T.grid(quads, lanes, 4):
                    with T.sblock("update"):
                        vi = T.axis.spatial(lanes, i)
                        vk = T.axis.reduce(4 * quads, g * 4 + k)
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vk // 4, vi, vk % 4], "int32")
        b_shape = (quads, lanes, 4)
    b_all = tuple(slice(0, e) for e in b_shape)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4 * quads,), "uint8", offset_factor=1),
             B: T.Buffer(b_shape, "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4 * quads], B[b_all])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = _IMPLS[isa](A, B, C, lanes, quads)

    name = f"ohq_dot_u8s8_{isa}" + (f"_x{quads}" if quads > 1 else "")
    s_tir.TensorIntrin.register(name, desc, impl, override=True)
    return name
