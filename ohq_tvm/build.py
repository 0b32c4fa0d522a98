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


def atomic_write(path: Path, write) -> None:
    """write(tmp) to a temporary file beside `path` (same suffix), then rename: a kill never leaves a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, prefix=f".{path.stem}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(executable: relax.VMExecutable, output: Path, target: Target, force: bool = False) -> Path:
    """Write the .so through a temporary file and rename it: a kill never leaves a partial file."""
    output = Path(output)
    if output.exists() and not force:
        raise OhqError(f"{output} exists; pass --force to overwrite it")
    output.parent.mkdir(parents=True, exist_ok=True)
    fcompile = None
    if not target.native:
        fcompile = tvm.support.cc.cross_compiler(target.require_cross_compiler())
    atomic_write(output, lambda tmp: executable.export_library(tmp, fcompile=fcompile))
    return output
