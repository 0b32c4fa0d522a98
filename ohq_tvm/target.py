"""Targets: the user's ``--target`` string -> a TVM target, a cache key and a cross compiler.

``llvm`` means this very CPU: the host's LLVM cpu name is filled in so kernels use its real
vector ISA (and only that: a Zen3 host gets AVX2 code, a Zen4 host AVX-512).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import tvm
from tvm.target import codegen

from .errors import OhqError

# Board shorthands -> (LLVM target attrs, Debian cross gcc)
_BOARDS = {
    "aarch64": ({"mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "aarch64-linux-gnu-gcc"),
    "armv7": ({"mtriple": "armv7a-linux-gnueabihf", "mattr": ["+neon"], "mfloat-abi": "hard"},
              "arm-linux-gnueabihf-gcc"),
}
_TRIPLE_CC = {attrs["mtriple"]: cc for attrs, cc in _BOARDS.values()}


@dataclass(frozen=True)
class Target:
    tvm: tvm.target.Target
    cpu_key: str           # stable name of the CPU: kind-cpu (schedules and MQE results live under it)
    threads: int
    cross_cc: str | None   # None: runs here

    @property
    def key(self) -> str:
        """kind-cpu-threads: the key of timings (OQA), which depend on the thread count."""
        return f"{self.cpu_key}-t{self.threads}"

    @property
    def native(self) -> bool:
        return self.cross_cc is None

    def require_cross_compiler(self) -> str:
        if self.cross_cc and shutil.which(self.cross_cc) is None:
            raise OhqError(f"cross compiler {self.cross_cc} not found "
                           f"(apt-get install gcc-{self.cross_cc.rsplit('-gcc', 1)[0]})")
        return self.cross_cc


def host_cpu() -> str:
    return codegen.llvm_get_system_cpu()


def default_threads() -> int:
    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


def parse_target(text: str, threads: int | None = None) -> Target:
    """Accepts ``llvm``, ``aarch64``, ``armv7`` or a TVM target JSON object."""
    threads = threads or default_threads()
    text = text.strip()
    if text == "llvm":
        attrs = {"kind": "llvm", "mcpu": host_cpu()}
    elif text in _BOARDS:
        attrs = {"kind": "llvm", **_BOARDS[text][0]}
    elif text.startswith("{"):
        try:
            attrs = json.loads(text)
        except json.JSONDecodeError as e:
            raise OhqError(f"--target is not valid JSON: {e}") from None
    else:
        raise OhqError(f"unknown --target {text!r}: use llvm, aarch64, armv7 or a TVM target JSON object")
    if not isinstance(attrs, dict) or attrs.get("kind") != "llvm":
        raise OhqError(f"unsupported --target {text!r}: only LLVM CPU targets are supported")
    attrs["num-cores"] = threads
    try:
        target = tvm.target.Target(attrs)
    except Exception as e:  # TVM raises its own error types for bad attributes
        raise OhqError(f"invalid --target {text!r}: {str(e).splitlines()[-1]}") from None
    triple = attrs.get("mtriple")
    cross_cc = _TRIPLE_CC.get(triple) if triple else None
    if triple and cross_cc is None and not triple.startswith("x86_64"):
        raise OhqError(f"no cross compiler known for mtriple {triple!r}")
    cpu = attrs.get("mcpu") or (triple or "generic").split("-")[0]
    return Target(tvm=target, cpu_key=f"llvm-{cpu}", threads=threads, cross_cc=cross_cc)
