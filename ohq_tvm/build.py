"""Compile a (fused, scheduled) Relax module and export a deployable shared library, atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import tvm
from tvm import relax

from .errors import OhqError
from .target import Target


def compile_module(mod: tvm.IRModule, target: Target) -> relax.VMExecutable:
    return tvm.compile(mod, target=target.tvm)


def export(executable: relax.VMExecutable, output: Path, target: Target, force: bool = False) -> Path:
    """Write the .so through a temporary file and rename it: a kill never leaves a partial file."""
    output = Path(output)
    if output.exists() and not force:
        raise OhqError(f"{output} exists; pass --force to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    fcompile = None
    if not target.native:
        fcompile = tvm.support.cc.cross_compiler(target.require_cross_compiler())
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=f".{output.stem}.", dir=output.parent)
    os.close(fd)
    try:
        executable.export_library(tmp, fcompile=fcompile)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return output
