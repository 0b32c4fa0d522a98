"""``python -m ohq_tvm.compile model.onnx --target llvm``: ONNX in, deployable ``.so`` out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from . import build, tune
from .cli import ArgumentParser, common_args, quiet_tvm_logs
from .errors import OhqError, run_cli
from .frontend import Imported, load_onnx, parse_shape, run_onnxruntime
from .layers import Layer, find_layers, layer_table
from .target import Target, parse_target


@dataclass
class Compiled:
    imported: Imported
    layers: list[Layer]
    target: Target
    executable: object                     # relax.VMExecutable
    tune_stats: tune.TuneStats
    stage_seconds: dict[str, float] = field(default_factory=dict)


def compile_onnx(model: str | Path, target: str | Target = "llvm", *, input_shape: tuple[int, ...] | None = None,
                 work_dir: str | Path = "tuning_logs", tune_trials: int = 32, threads: int | None = None,
                 console: Console | None = None) -> Compiled:
    """Import, schedule every kernel (tuning only what the logs miss) and compile."""
    console = console or Console(stderr=True, quiet=True)
    target = target if isinstance(target, Target) else parse_target(target, threads)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    imported = load_onnx(model, input_shape)
    layers = find_layers(imported.mod)
    stages["import"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    fused = tune.fuse(imported.mod, target)
    with console.status(f"scheduling kernels for {target.key} (MetaSchedule, logs in {work_dir})"):
        stats = tune.tune(fused, target, Path(work_dir), tune_trials)
        scheduled = tune.apply(fused, target, Path(work_dir))
    stages["tune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    executable = build.compile_module(scheduled, target)
    stages["build"] = time.perf_counter() - t0
    return Compiled(imported, layers, target, executable, stats, stages)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m ohq_tvm.compile", description=__doc__)
    common_args(parser)
    parser.add_argument("--output", "-o", type=Path, help="output .so (default: ./<model name>.so)")
    parser.add_argument("--tune-trials", type=int, default=32,
                        help="MetaSchedule trials for each kernel missing from the tuning logs (0: no tuning)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise OhqError("--threads must be >= 1")
    if args.tune_trials < 0:
        raise OhqError("--tune-trials must be >= 0")
    quiet_tvm_logs()
    console = Console(stderr=True)
    target = parse_target(args.target, args.threads)
    output = args.output or Path(args.model.stem + ".so")
    if output.exists() and not args.force:
        raise OhqError(f"{output} exists; pass --force to overwrite it")

    result = compile_onnx(args.model, target, input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                          work_dir=args.work_dir, tune_trials=args.tune_trials, console=console)
    Console().print(layer_table(result.layers))
    stats = result.tune_stats
    console.print(f"kernels: {stats.tasks}, tuned now: {stats.tuned}, from logs: {stats.tasks - stats.tuned}")
    t0 = time.perf_counter()
    build.export(result.executable, output, target, force=args.force)
    result.stage_seconds["export"] = time.perf_counter() - t0

    if target.native:
        from .runtime import Model
        x = np.random.default_rng(0).standard_normal(result.imported.input_shape, dtype=np.float32)
        diff = float(np.abs(Model.load(output)(x) - run_onnxruntime(args.model, x)).max())
        console.print(f"max |ours - onnxruntime| on a random input: {diff:.2e}")
    console.print(f"wrote {output}  ({', '.join(f'{k} {v:.1f}s' for k, v in result.stage_seconds.items())})")
    return 0


if __name__ == "__main__":
    run_cli(main)
