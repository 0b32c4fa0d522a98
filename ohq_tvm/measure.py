"""OQA: time every quantizable layer at every bit-width candidate on the target itself.

Each (workload, candidate) is a small knob search over the kernel template, built by
MetaSchedule's LocalBuilder and timed by its LocalRunner (subprocesses, timeouts, fastest of
repeats) or, with ``--rpc-tracker``, by its RPCRunner on a board. An XGBoost cost model (the one
MetaSchedule tunes with) trained on the records so far picks which knob settings are worth
building once it has seen enough. FP32 layers are the MetaSchedule-tuned kernels of ohq_tvm.tune.

Every measurement is appended to a JSON-lines log (flush + fsync) under
``<work dir>/<target key>/oqa.jsonl``, keyed by TVM version, target, workload, candidate and
knobs: a killed run resumes without measuring anything twice. A layer's candidates are compared
only with figures of one run: when their records come from different runs (a resumed run, a
template revision re-measured on another day), the latest run that timed them all is used, else the
best setting of each is timed again side by side, and those figures are logged and used. Each
measuring run first compacts the log to the records a lookup still reaches (`TuningLog.compact`).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
import tvm.s_tir as s_tir
import tvm.s_tir.meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from . import kernels
from .kernels import CANDIDATES, Config, Knobs
from .layers import Layer
from .target import Target
from .build import atomic_write
from .errors import OhqError
from .tune import skip_gpu_intrinsics


def workload_key(layer: Layer) -> str:
    """Layers with equal keys run the same kernel (the key carries no id)."""
    shape = lambda s: "x".join(map(str, s))   # noqa: E731
    key = f"{layer.op}:{shape(layer.input_shape)}:{shape(layer.weight_shape)}"
    if layer.op == "conv2d":
        key += f":s{shape(layer.strides)}:p{shape(layer.padding)}:g{layer.groups}"
    key += ":codes-in" * layer.codes_in + ":codes-out" * layer.codes_out
    return key


def candidates_for_bits(bits: Iterable[int]) -> list[Config]:
    """FP32 plus every integer candidate whose weight and activation bits are both allowed."""
    allowed = set(bits)
    return [c for c in CANDIDATES.values() if c.family == "fp32" or {c.wbits, c.abits} <= allowed]


# 7 timings, each averaging calls over >= 10 ms. The fastest is kept: interference from the rest of the machine
# only ever slows a kernel down, and at 2 threads on 2 cores one preempted thread stalls the whole kernel (the
# median of a run still swung 0.5-1.75x between runs).
EVALUATOR = ms.runner.EvaluatorConfig(number=1, repeat=7, min_repeat_ms=10, enable_cpu_cache_flush=False)
GIVE_UP = 1.5    # a candidate whose first setting is this much slower than the layer's fastest is not refined


@dataclass(frozen=True)
class Record:
    """One line of the tuning log."""
    tvm: str
    target: str
    workload: str
    config: str
    knobs: list[int] | None    # the timed knob setting; on the final line of a search, the best one
    ms: float | None           # None: failed to build or run
    final: bool = False        # the search for (workload, config) is complete
    error: str | None = None
    revision: int = 1          # of the kernel template (kernels.REVISIONS)
    run: str | None = None     # the Measurer that timed it (None: logged before runs were recorded)


class TuningLog:
    """Append-only JSON lines; corrupt lines are skipped with a warning."""

    def __init__(self, path: Path, target: Target) -> None:
        self.path, self.target = Path(path), target
        self.records: list[Record] = []
        if self.path.exists():
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                try:
                    record = Record(**json.loads(line))
                except (ValueError, TypeError):
                    warnings.warn(f"{self.path}:{number}: corrupt tuning record skipped", stacklevel=2)
                    continue
                if record.tvm == tvm.__version__ and record.target == target.key:
                    self.records.append(record)

    def lookup(self, workload: str, config: str, revision: int = 1) -> list[Record]:
        return [r for r in self.records if r.workload == workload and r.config == config and r.revision == revision]

    def append(self, record: Record) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)

    def compact(self) -> int:
        """Drop the lines no lookup reaches: a search's timings once it has a final record, and every final
        record but the last of its workload, candidate, template revision and run (FP32: and schedule; a run's
        finals are what `side_by_side` compares). Corrupt lines and other TVM versions' records are kept as
        they are. Returns how many lines were dropped."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text().splitlines()
        rows = []
        for line in lines:
            try:
                rows.append(Record(**json.loads(line)))
            except (ValueError, TypeError):
                rows.append(None)
        key = lambda r: (r.tvm, r.target, r.workload, r.config, r.revision,  # noqa: E731
                         tuple(r.knobs or ()) if r.config == "FP32" else None, r.run)
        last_final = {key(r): i for i, r in enumerate(rows) if r is not None and r.final}
        searched = {k[:5] for k in last_final}
        kept = [line for i, (line, r) in enumerate(zip(lines, rows))
                if r is None or (last_final.get(key(r)) == i if r.final else key(r)[:5] not in searched)]
        if len(kept) < len(lines):
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
        return len(lines) - len(kept)


@dataclass
class LayerTiming:
    layer: Layer
    workload: str
    ms: dict[str, float | None] = field(default_factory=dict)    # candidate name -> ms (None: unavailable)
    knobs: dict[str, list[int] | None] = field(default_factory=dict)


@dataclass
class Measurement:
    target: str
    threads: int
    layers: list[LayerTiming]
    builds: int
    measurements: int
    seconds: float

    def to_json(self) -> dict:
        return {"target": self.target, "threads": self.threads, "builds": self.builds,
                "measurements": self.measurements, "seconds": round(self.seconds, 2),
                "layers": [{"id": t.layer.id, "op": t.layer.op, "kind": t.layer.kind,
                            "shape": list(t.layer.input_shape), "weight": list(t.layer.weight_shape),
                            "candidates": t.ms} for t in self.layers]}


def _fastest_ms(result: ms.runner.RunnerResult) -> float | None:
    if result.error_msg is not None or not result.run_secs:
        return None
    return min(float(s) for s in result.run_secs) * 1e3


class Measurer:
    """Builds kernels in a pool of worker processes and times them with MetaSchedule's runner, counting both."""

    def __init__(self, target: Target, runner: ms.runner.Runner | None = None, timeout_sec: float = 60,
                 guided_after: int = 24) -> None:
        os.environ["TVM_NUM_THREADS"] = str(target.threads)    # inherited by the runner's workers
        skip_gpu_intrinsics()
        self.target = target
        # MetaSchedule's LocalBuilder starts new worker processes (each importing TVM, ~1.3 s) on every call,
        # which was half of cold OQA's time; one pool is kept instead, its workers renewed every 32 builds
        # (TVM renews them because they leak memory)
        self.builders = PopenPoolExecutor(timeout=timeout_sec, initializer=skip_gpu_intrinsics,
                                          maximum_process_uses=32)
        self.timeout_sec = timeout_sec
        self.runner = runner or ms.runner.LocalRunner(
            timeout_sec=timeout_sec, initializer=skip_gpu_intrinsics,
            evaluator_config=EVALUATOR)
        self.guided_after = guided_after
        self.seen = self.builds = self.measurements = 0
        self.run = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"

    # made on first use: a TuneContext imports MetaSchedule's schedule rules (7 s), wasted on a warm log
    @cached_property
    def model(self) -> ms.cost_model.XGBModel:
        return ms.cost_model.XGBModel(num_warmup_samples=0)

    @cached_property
    def context(self) -> ms.TuneContext:
        return ms.TuneContext(target=self.target.tvm)

    def record(self, workload: str, config: str, knobs: list[int] | None, ms: float | None, *, final: bool = False,
               error: str | None = None, revision: int = 1) -> Record:
        """A tuning-log record of this measurer's target and run."""
        return Record(tvm.__version__, self.target.key, workload, config, knobs, ms, final, error, revision, self.run)

    def close(self) -> None:
        """Stop the build workers (left to the garbage collector, TVM warns, their shutdown can deadlock)."""
        self.builders.shutdown()

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _candidates(self, funcs: list[tvm.tirx.PrimFunc]) -> list[ms.MeasureCandidate]:
        return [ms.MeasureCandidate(s_tir.Schedule(f), ms.arg_info.ArgInfo.from_prim_func(f)) for f in funcs]

    def rank(self, funcs: list[tvm.tirx.PrimFunc], keep: int) -> list[int]:
        """Indices of the `keep` settings the cost model predicts fastest, best first (until it has seen
        enough timings: the first `keep`, in the template's order, widest register tile first)."""
        if self.seen < self.guided_after or len(funcs) <= 1:
            return list(range(min(keep, len(funcs))))
        scores = self.model.predict(self.context, self._candidates(funcs))
        return np.argsort(-np.asarray(scores), kind="stable")[:keep].tolist()

    def build(self, funcs: list[tvm.tirx.PrimFunc]) -> list[ms.builder.BuilderResult]:
        """Compile and export each function in the worker pool (the results of MetaSchedule's LocalBuilder)."""
        jobs = [(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), self.target.tvm) for f in funcs]
        results = []
        for done in self.builders.map_with_error_catching(lambda job: _build_and_export(*job), jobs):
            if done.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {done.value}"))
        self.builds += len(funcs)
        return results

    def time(self, funcs: list[tvm.tirx.PrimFunc], runs: int = 1) -> list[float | None]:
        """Each function's latency in ms (None: failed); with `runs` > 1, built once, timed that many times,
        the lowest figure kept."""
        built = self.build(funcs)
        ok = [i for i, b in enumerate(built) if b.error_msg is None]
        inputs = [ms.runner.RunnerInput(built[i].artifact_path, "cpu", ms.arg_info.ArgInfo.from_prim_func(funcs[i]))
                  for i in ok]
        times: list[float | None] = [None] * len(funcs)
        for _ in range(runs if ok else 0):
            results = [f.result() for f in self.runner.run(inputs)]
            self.measurements += len(ok)
            for i, result in zip(ok, results):
                times[i] = min((t for t in (times[i], _fastest_ms(result)) if t is not None), default=None)
            self.model.update(self.context, self._candidates([funcs[i] for i in ok]), results)
            self.seen += len(ok)
        for b in built:
            if b.artifact_path:
                Path(b.artifact_path).unlink(missing_ok=True)
        return times


def _build_and_export(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    return default_export(default_build(mod, target, None))


def search(layer: Layer, config: Config, measurer: Measurer, log: TuningLog, keep: int = 3,
           give_up_ms: float | None = None) -> Record:
    """Best knob setting of `layer`'s kernel at `config`; resumes from the log, logs every timing.

    The most promising setting is timed first; if it is slower than `give_up_ms` (a multiple of the
    fastest candidate measured for the layer), the others are not built: a candidate slower than one
    that is also more accurate is never chosen. The best setting is timed once more after the others and
    keeps the lower figure, so one burst of interference cannot decide a layer's latency.
    """
    key, target = workload_key(layer), measurer.target
    revision = kernels.revision(layer, config)
    done = log.lookup(key, config.name, revision)
    final = next((r for r in reversed(done) if r.final), None)
    if final is not None:
        return final
    new = lambda knobs, ms_, final=False, error=None: measurer.record(   # noqa: E731
        key, config.name, knobs, ms_, final=final, error=error, revision=revision)
    timings: dict[tuple[int, ...], list[float]] = {}     # knob setting -> its timings (none: failed)
    for r in done:
        if r.knobs is not None:
            timings.setdefault(tuple(r.knobs), []).extend([r.ms] if r.ms is not None else [])

    def build(knobs: Knobs) -> tvm.tirx.PrimFunc:
        return _kernel(layer, config, knobs, target)

    def time_settings(settings: list[tuple[Knobs, tvm.tirx.PrimFunc]]) -> None:
        for (knobs, _), ms_ in zip(settings, measurer.time([f for _, f in settings])):
            timings.setdefault((knobs.tile_w, knobs.tile_o), []).extend([ms_] if ms_ is not None else [])
            log.append(new([knobs.tile_w, knobs.tile_o], ms_))

    def fastest() -> tuple[int, ...] | None:
        timed = {k: min(v) for k, v in timings.items() if v}
        return min(timed, key=timed.get) if timed else None

    space = kernels.knob_space(layer, config, kernels.isa_of(target.tvm))
    todo = []
    for knobs in (k for k in space if (k.tile_w, k.tile_o) not in timings):
        try:
            todo.append((knobs, build(knobs)))
        except Exception as e:   # a setting the schedule rejects is recorded, not fatal
            timings[(knobs.tile_w, knobs.tile_o)] = []
            log.append(new([knobs.tile_w, knobs.tile_o], None, error=str(e).splitlines()[-1][:200]))
    picked = [todo[i] for i in measurer.rank([f for _, f in todo], keep)] if todo else []
    for batch in (picked[:1], picked[1:]):
        if batch:
            time_settings(batch)
        best = fastest()
        if give_up_ms is not None and best is not None and min(timings[best]) > give_up_ms:
            break
    if best is not None and len(timings[best]) == 1:
        knobs = Knobs(*best)
        time_settings([(knobs, build(knobs))])
    best = fastest()
    record = new(list(best) if best else None, min(timings[best]) if best else None, final=True,
                 error=None if best else "no knob setting built and ran")
    log.append(record)
    return record


def _kernel(layer: Layer, config: Config, knobs: Knobs, target: Target) -> tvm.tirx.PrimFunc:
    return kernels.build(layer, config, knobs, target.tvm, kernels.Io.of(layer))


def side_by_side(layer: Layer, records: dict[str, Record], fp32: tvm.tirx.PrimFunc | None, measurer: Measurer,
                 log: TuningLog) -> dict[str, Record]:
    """`records` (candidate -> final record of one workload) from one run: the latest run that timed them all
    (`_one_run`), else timed again, interleaved: each candidate's best setting built once, all timed twice in
    turn, the lower figure logged as a new final.

    Records of different runs are not comparable: one session's W8A8 records were 15-27% slower than the same
    kernels timed next to the low-bit ones a day later, and every mix's predicted gain over INT8 was inflated.
    """
    redo = {name: r for name, r in records.items()
            if r.ms is not None and r.knobs is not None and (name != "FP32" or fp32 is not None)}
    runs = {r.run for r in redo.values()}
    if len(runs) <= 1 and None not in runs:
        return records
    earlier = _one_run(redo, log)
    if earlier is not None:
        return {**records, **earlier}
    funcs = [fp32 if name == "FP32" else _kernel(layer, CANDIDATES[name], Knobs(*r.knobs), measurer.target)
             for name, r in redo.items()]
    again = dict(records)
    for (name, r), ms_ in zip(redo.items(), measurer.time(funcs, runs=2)):
        again[name] = measurer.record(r.workload, name, r.knobs, ms_, final=True, revision=r.revision,
                                      error=None if ms_ is not None else "failed when timed again")
        log.append(again[name])
    return again


def _one_run(records: dict[str, Record], log: TuningLog) -> dict[str, Record] | None:
    """The finals of the latest run that timed every candidate of `records` (same template revision; FP32:
    same schedule), if any: two models whose FP32 kernels of one workload differ (a residual add's operands
    swapped) would otherwise time its candidates again each time the other model is measured."""
    by_run = [{r.run: r for r in log.lookup(record.workload, name, record.revision)
               if r.final and r.ms is not None and r.run is not None and (name != "FP32" or r.knobs == record.knobs)}
              for name, record in records.items()]
    common = set.intersection(*(set(runs) for runs in by_run))
    if not common:
        return None
    latest = max(common)        # run ids start with their time, YYYYmmddTHHMMSS
    return {name: runs[latest] for name, runs in zip(records, by_run)}


# ---------------------------------------------------------------------------------------------
# In-process helpers (benchmarks, latency checks): build one kernel and time it on random data.

def build_kernel(layer: Layer, config: Config, knobs: Knobs, target: tvm.target.Target) -> tvm.runtime.Module:
    func = kernels.build(layer, config, knobs, target, kernels.Io.of(layer))
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def kernel_args(layer: Layer, config: Config, knobs: Knobs, target: tvm.target.Target, seed: int = 0) -> list:
    """Random but well-formed arguments: input, packed weights, channel and quantization params, output."""
    rng = np.random.default_rng(seed)
    act = kernels.ActQuant.from_range(-1, 3, config.abits)
    x = rng.uniform(-1, 3, layer.input_shape).astype(np.float32)
    x = act.quantize(x) if layer.codes_in else x
    weight = rng.standard_normal(layer.weight_shape).astype(np.float32)
    packed = kernels.pack(layer, config, knobs, kernels.isa_of(target), weight, None, act, clamp=(0.0, 6.0),
                          out_act=kernels.ActQuant.from_range(0, 6, 8) if layer.codes_out else None)
    out = np.zeros(layer.output_shape, kernels.Io.of(layer).out_dtype)
    return [tvm.runtime.tensor(a) for a in (x, packed.w, packed.chan, packed.q, out)]


def time_module(lib: tvm.runtime.Module, args: list, min_repeat_ms: int = 50, repeat: int = 5) -> float:
    """Median ms of `repeat` timings, each averaging calls over >= min_repeat_ms."""
    timer = lib.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=min_repeat_ms)
    return float(np.median(timer(*args).results)) * 1e3


# ---------------------------------------------------------------------------------------------
def measure_model(layers: list[Layer], fp32_kernels: list[tvm.tirx.PrimFunc] | None, configs: list[Config],
                  measurer: Measurer, log: TuningLog, progress: Callable[[str], None] = lambda _: None
                  ) -> Measurement:
    """Every layer x candidate; identical workloads are measured once, their candidates in one run. The log
    is compacted first (what earlier runs superseded)."""
    t0 = time.perf_counter()
    log.compact()
    by_workload: dict[str, LayerTiming] = {}
    timings = []
    for index, layer in enumerate(layers):
        key = workload_key(layer)
        if key in by_workload:
            timings.append(LayerTiming(layer, key, by_workload[key].ms, by_workload[key].knobs))
            continue
        fp32 = fp32_kernels[index] if fp32_kernels else None
        records: dict[str, Record | None] = {}
        for config in configs:
            progress(f"{layer.id} {config.name}")
            if config.family == "fp32":
                records[config.name] = _fp32_record(layer, fp32, measurer, log)
            elif kernels.family(layer, config) is None:
                records[config.name] = None
            else:
                known = [r.ms for r in records.values() if r is not None and r.ms is not None]
                give_up = GIVE_UP * min(known) if known and config.name != "W8A8" else None
                records[config.name] = search(layer, config, measurer, log, give_up_ms=give_up)
        records.update(side_by_side(layer, {k: r for k, r in records.items() if r is not None}, fp32, measurer, log))
        timing = LayerTiming(layer, key, {k: None if r is None else r.ms for k, r in records.items()},
                             {k: r.knobs for k, r in records.items() if r is not None and k != "FP32"})
        by_workload[key] = timing
        timings.append(timing)
    return Measurement(measurer.target.key, measurer.target.threads, timings, measurer.builds,
                       measurer.measurements, time.perf_counter() - t0)


def _fp32_record(layer: Layer, func: tvm.tirx.PrimFunc | None, measurer: Measurer, log: TuningLog) -> Record | None:
    """The MetaSchedule-scheduled FP32 kernel of the layer (with its fused epilogue), timed like the rest.

    Its record is keyed by the schedule's structural hash: more tuning (a new schedule) is timed anew.
    """
    key = workload_key(layer)
    schedule = None if func is None else [int(tvm_ffi.structural_hash(func))]
    done = [r for r in log.lookup(key, "FP32") if r.final and (schedule is None or r.knobs == schedule)]
    if done:
        return done[-1]
    if func is None:
        return None
    [ms_] = measurer.time([func], runs=2)     # the lower of two timings, as in search
    record = measurer.record(key, "FP32", schedule, ms_, final=True)
    log.append(record)
    return record


def measurement_table(result: Measurement, configs: list[Config]):
    from rich.table import Table
    table = Table(title=f"OQA: ms per layer on {result.target} ({result.threads} threads); "
                        f"* fastest, x = speedup of the fastest vs W8A8 / FP32")
    table.add_column("layer")
    table.add_column("kind")
    for config in configs:
        table.add_column(config.name, justify="right")
    table.add_column("vs W8A8", justify="right")
    table.add_column("vs FP32", justify="right")
    for timing in result.layers:
        valid = {k: v for k, v in timing.ms.items() if v is not None}
        fastest = min(valid, key=valid.get) if valid else None
        cells = [("-" if timing.ms.get(c.name) is None else
                  f"{'*' if c.name == fastest else ''}{timing.ms[c.name]:.4f}") for c in configs]
        ratio = lambda ref: f"{valid[ref] / valid[fastest]:.2f}x" if fastest and ref in valid else "-"  # noqa: E731
        table.add_row(timing.layer.id, timing.layer.kind, *cells, ratio("W8A8"), ratio("FP32"))
    return table


def rpc_runner(tracker: str, key: str, timeout_sec: float) -> ms.runner.RPCRunner:
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise OhqError(f"--rpc-tracker {tracker!r}: expected HOST:PORT")
    return ms.runner.RPCRunner(
        ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=key, session_timeout_sec=timeout_sec),
        evaluator_config=EVALUATOR,
        initializer=skip_gpu_intrinsics)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from .cli import ArgumentParser, common_args, parse_bits, quiet_tvm_logs
    from .frontend import load_onnx, parse_shape
    from .layers import find_layers
    from .target import parse_target
    from . import tune

    parser = ArgumentParser(prog="python -m ohq_tvm.measure", description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--bits", default="8,4,2,1", help="allowed weight/activation bit-widths (default 8,4,2,1)")
    parser.add_argument("--json", type=Path, help="write the measurements as JSON")
    parser.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on its boards")
    parser.add_argument("--rpc-key", help="device key of the boards at the tracker")
    parser.add_argument("--tune-trials", type=int, default=32, help="MetaSchedule trials for missing FP32 kernels")
    args = parser.parse_args(argv)
    bits = parse_bits(args.bits)
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise OhqError("--rpc-tracker and --rpc-key go together")
    quiet_tvm_logs()
    console = Console(stderr=True)
    target = parse_target(args.target, args.threads)
    imported = load_onnx(args.model, parse_shape(args.input_shape) if args.input_shape else None)
    layers = find_layers(imported.mod)
    configs = candidates_for_bits(bits)
    runner = rpc_runner(args.rpc_tracker, args.rpc_key, 60) if args.rpc_tracker else None
    if not target.native and runner is None:
        raise OhqError(f"{target.key} is not this CPU: measuring it needs --rpc-tracker and --rpc-key")

    fused = tune.fuse(imported.mod, target)
    with console.status("FP32 kernels (MetaSchedule)"):
        tune.tune(fused, target, args.work_dir, args.tune_trials)
        fp32 = tune.layer_kernels(tune.apply(fused, target, args.work_dir), layers)
    if fp32 is None:
        console.print("[yellow]FP32 kernels not matched to layers: FP32 not timed")
    log = TuningLog(Path(args.work_dir) / target.key / "oqa.jsonl", target)
    unique = len({workload_key(layer) for layer in layers})
    with Progress(console=console, transient=True) as progress, Measurer(target, runner) as measurer:
        task = progress.add_task("measuring", total=unique * len(configs))
        result = measure_model(layers, fp32, configs, measurer, log,
                               lambda what: progress.update(task, advance=1, description=what))
    Console().print(measurement_table(result, configs))
    console.print(f"{result.builds} builds, {result.measurements} measurements in {result.seconds:.1f} s "
                  f"(log: {log.path})")
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from .errors import run_cli
    run_cli(main)
