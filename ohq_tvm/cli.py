"""Shared command-line plumbing: one-line argument errors, common options, quiet TVM logs."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .errors import OhqError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + error; we want one line
        if message.startswith("argument --input-range: expected one argument"):
            message += " (a negative LO needs '=': --input-range=-1,1)"
        raise OhqError(message)


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="ONNX model")
    parser.add_argument("--target", default="llvm", help="llvm (this CPU), aarch64, armv7 or TVM target JSON")
    parser.add_argument("--input-shape", help="static input shape, e.g. 1,3,224,224 (for dynamic models)")
    parser.add_argument("--threads", type=int, help="threads the model runs with (default: TVM_NUM_THREADS or all cores)")
    parser.add_argument("--work-dir", type=Path, default=Path("tuning_logs"), help="tuning logs (default: tuning_logs)")


def parse_bits(text: str) -> tuple[int, ...]:
    """`--bits 8,4,2` -> (2, 4, 8)."""
    try:
        bits = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        raise OhqError(f"--bits {text!r}: expected comma-separated integers, e.g. 8,4,2") from None
    if not set(bits) <= {1, 2, 4, 8}:
        raise OhqError(f"--bits {text!r}: supported bit-widths are 8, 4, 2, 1")
    return bits


def input_range_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-range", type=_parse_range, metavar="LO,HI",
                        help="the model input's value range when known, e.g. --input-range=-1,1 (a negative LO "
                             "needs the '=') or 0,1 for normalized images: data-free inputs stay in it")


def _parse_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise OhqError(f"--input-range {text!r}: expected LO,HI, e.g. -1,1") from None
    if not lo < hi:
        raise OhqError(f"--input-range {text!r}: LO must be below HI")
    return lo, hi


def quiet_tvm_logs() -> None:
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    os.environ.setdefault("TVM_LOG_DEBUG", "0")
