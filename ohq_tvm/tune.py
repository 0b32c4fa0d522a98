"""Schedules for every kernel TVM generates (FP32 layers and glue ops).

TVM's default lowering leaves kernels unscheduled (40-100x slower than ONNX Runtime). Kernels that
reduce (convs, matmuls, pooling, softmax) are tuned with MetaSchedule's XGBoost cost model; records
live in a JSON database per CPU (``tuning_logs/<kind-cpu>/metaschedule``, shared by thread counts: a
schedule tuned at 2 threads is replayed at 1) and are re-applied without re-tuning: only tasks missing
from the database are tuned. Injective kernels (elementwise, reshapes, MQE's fake quantizers) are
memory-bound and get a fixed rule instead of a search: inline into one loop nest, parallel outer part,
vectorized inner part. Reducing kernels have a fixed tiling rule too (`rule`): constant weights rewritten
so the vectorized output channels are contiguous and blocked by the vector lanes, a register tile of
accumulators, the largest operand walked once. It is timed as the first candidate of every task tuned and
committed as a record, so `apply` takes the better of it and the search; a kernel without a record (MQE's
gradient module, ``--tune-trials 0``, a cross-compiled target) gets it directly (untuned ResNet-18 FP32:
0.7x the latency of 16 MetaSchedule trials per kernel, EfficientNet-Lite0 on par). Every timing is one call
with cold weights (`_runner`), as inside a model: the search's record of EfficientNet-Lite0's 7x7 1x1
expansion conv timed 182 us warm, 790 us cold, and took 800 us a call in the model (the rule: 480), so warm
records kept it over the rule.
"""
from __future__ import annotations

import json
import math
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm.s_tir as s_tir
from tvm import relax
import tvm.s_tir.meta_schedule as ms

from .build import atomic_write
from .errors import OhqError, last_line
from .layers import copy_module
from .target import Target

_GPU_INTRINSICS = ("cuda", "rocm", "hexagon", "metal")


@dataclass(frozen=True)
class Registers:
    """The vector register file a tile of accumulators has to fit in."""
    count: int
    floats: int     # float32 lanes of one register

    @classmethod
    def of(cls, target: tvm.target.Target | None) -> "Registers":
        """AVX-512: 32 x 16 floats, AVX2: 16 x 8, aarch64 NEON: 32 x 4, armv7 NEON and anything else: 16 x 4."""
        if target is None:
            return cls(16, 4)
        has = lambda feature: tvm.target.codegen.target_has_features(feature, target)  # noqa: E731
        if has("avx512f"):
            return cls(32, 16)
        if has("avx2"):
            return cls(16, 8)
        return cls(32, 4) if str(target.attrs.get("mtriple", "")).startswith("aarch64") else cls(16, 4)


def skip_gpu_intrinsics() -> None:
    """Importing tvm.s_tir.tensor_intrin pulls the GPU intrinsic modules (30-45 s); CPUs need none."""
    for name in _GPU_INTRINSICS:
        sys.modules.setdefault(f"tvm.s_tir.tensor_intrin.{name}", types.ModuleType(name))


@dataclass(frozen=True)
class TuneStats:
    tasks: int
    tuned: int          # tasks that were missing from the database
    trials: int
    untuned: int = 0    # tasks left without a record (no trials, or not this CPU): the fixed rule schedules them
    rule_best: int = 0  # of the tasks the rule was timed for, those where its schedule is the fastest record


def fuse(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """Legalize, fold and fuse: the module whose PrimFuncs are the tuning tasks.

    Weights are marked layout-free, so MetaSchedule may choose a packed weight layout; `apply`
    then folds the repacking into the (constant) weights.
    """
    with target.tvm:
        return tvm.transform.Sequential([
            relax.get_pipeline("zero"),
            relax.transform.AttachAttrLayoutFreeBuffers(),
        ])(mod)


def database_dir(work_dir: Path, target: Target) -> Path:
    return Path(work_dir) / target.cpu_key / "metaschedule"


_opened: dict[Path, tuple[tuple, ms.database.JSONDatabase]] = {}


def _database(work_dir: Path, target: Target) -> ms.database.JSONDatabase:
    """The database of `work_dir`, parsed once per process while its files are unchanged (a compile
    schedules several modules, each reading it twice: 2 s a read with the committed records)."""
    path = database_dir(work_dir, target).resolve()
    path.mkdir(parents=True, exist_ok=True)
    files = [path / name for name in ("database_workload.json", "database_tuning_record.json")]
    stamp = tuple(_stamp(f) for f in files)
    if path in _opened and _opened[path][0] == stamp:
        return _opened[path][1]
    for file in files:
        _check_json_lines(file)
    try:
        db = ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
    except Exception as e:  # TVM's own parse errors
        raise OhqError(f"tuning database {path} is unreadable ({last_line(e, 200)}); "
                       "move it away to re-tune") from None
    _opened[path] = (stamp, db)
    return db


def _stamp(file: Path) -> tuple[int, int] | None:
    try:
        stat = file.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _check_json_lines(file: Path) -> None:
    """TVM aborts on a damaged database; name the file and line instead (the file is left as it is)."""
    if not file.exists():
        return
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise OhqError(f"tuning database {file} is unreadable: {e}") from None
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, list) or len(row) != 2:
            raise OhqError(f"tuning database {file} line {number} is corrupt; delete that line (or the file, "
                           "to re-tune)")


def tune(fused: tvm.IRModule, target: Target, work_dir: Path, trials_per_task: int = 64,
         seed: int = 0, top_up: int = 0, rule_everywhere: bool = False) -> TuneStats:
    """Tune the PrimFuncs of `fused` that the database has no record for.

    The fixed rule (`rule`) is the first candidate of every task tuned: it is timed and committed as a
    record, so the search starts from it and `apply` takes it where it is faster than what the search found
    (it beats 16 trials on most convs of a depthwise-separable network). `rule_everywhere`: time it for every
    task, also those with records (databases tuned before the rule was a candidate).
    `top_up`: also give the `top_up` kernels that take the most time (best record x occurrences)
    `trials_per_task` more trials; the search starts from the records already in the database.
    """
    skip_gpu_intrinsics()
    tasks = _tasks(fused, target)
    db = _database(work_dir, target)
    missing = _missing(tasks, db)
    todo = missing + (_heaviest([t for t in tasks if t not in missing], db, top_up) if top_up else [])
    searched = trials_per_task > 0 and target.native
    ruled = tasks if rule_everywhere and target.native else todo if searched else []
    rule_seconds = _commit_rule(ruled, db, target) if ruled else []
    if todo and searched:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            todo, work_dir=str(database_dir(work_dir, target)), seed=seed)
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(database_dir(work_dir, target)),
            max_trials_global=trials_per_task * len(todo), max_trials_per_task=trials_per_task,
            num_trials_per_iter=min(32, trials_per_task), database=db, cost_model="xgb",
            builder=_builder(), runner=_runner())
    if ruled or (todo and searched):
        prune(database_dir(work_dir, target))
    tuned = len(todo) if searched else 0
    rule_best = sum(_best_seconds(t, db) >= seconds for t, seconds in rule_seconds)
    return TuneStats(tasks=len(tasks), tuned=tuned, trials=trials_per_task * tuned,
                     untuned=len(_missing(tasks, db)), rule_best=rule_best)


def _builder() -> ms.builder.Builder:
    return ms.builder.LocalBuilder(timeout_sec=60, initializer=skip_gpu_intrinsics)


def _runner() -> ms.runner.Runner:
    # one call per timing, the cache flushed of every argument but the input first: inside a model the other
    # layers evict a kernel's weights, and a warm loop hides a schedule that re-reads a big weight
    # (ResNet-18's conv2d9 record: 4.0 ms warm, 11.7 ms in the model)
    return ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
        number=1, repeat=5, min_repeat_ms=0, enable_cpu_cache_flush=True))


def _time(schedules: list[s_tir.Schedule], args: list, target: Target) -> list:
    """Build and time each schedule the way the search times its candidates: its run seconds, or None if it
    failed to build or run."""
    built = _builder().build([ms.builder.BuilderInput(s.mod, target.tvm) for s in schedules])
    ok = [i for i, b in enumerate(built) if b.error_msg is None]
    runs = _runner().run([ms.runner.RunnerInput(built[i].artifact_path, "cpu", args[i]) for i in ok])
    seconds: list = [None] * len(schedules)
    for i, run in zip(ok, runs):
        result = run.result()
        if result.error_msg is None:
            seconds[i] = [float(s) for s in result.run_secs]
    return seconds


def _commit_rule(tasks: list, db: ms.database.Database, target: Target) -> list[tuple]:
    """Time the rule's schedule of each task and commit it as a tuning record (its trace replays like any
    other). Returns (task, its mean seconds) pairs."""
    # the rule schedules the database's copy of the workload: a structurally equal kernel of another model
    # names its blocks differently, and a trace replays by block names
    workloads = [db.commit_workload(t.dispatched[0]) for t in tasks]
    schedules = [rule(w.mod["main"], registers=Registers.of(target.tvm)) for w in workloads]
    args = [ms.arg_info.ArgInfo.from_entry_func(s.mod) for s in schedules]   # weights in the rewritten layout
    timed = []
    for task, workload, schedule, arg, run_secs in zip(tasks, workloads, schedules, args, _time(schedules, args, target)):
        if run_secs is not None:
            db.commit_tuning_record(ms.database.TuningRecord(schedule.trace, workload, run_secs, target.tvm, arg))
            timed.append((task, _mean(run_secs)))
    return timed


def retime(work_dir: Path, target: Target, chunk: int = 32) -> tuple[int, int]:
    """Time every record of the database again with `_runner` and rewrite its seconds in place (a database
    timed by another runner is not comparable with new records). A record that no longer builds or runs is
    dropped. Returns (re-timed, dropped)."""
    from rich.progress import Progress
    path = database_dir(work_dir, target)
    _database(work_dir, target)     # checks both files
    workloads = [ms.database.Workload.from_json(json.loads(line))
                 for line in (path / "database_workload.json").read_text().splitlines()]
    records_file = path / "database_tuning_record.json"
    rows = [json.loads(line) for line in records_file.read_text().splitlines()]
    kept = []
    with Progress(transient=True) as progress:
        bar = progress.add_task("re-timing records", total=len(rows))
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            candidates = [ms.database.TuningRecord.from_json(row[1], workloads[row[0]]).as_measure_candidate()
                          for row in part]
            seconds = _time([c.sch for c in candidates], [c.args_info for c in candidates], target)
            for row, run_secs in zip(part, seconds):
                if run_secs is not None:
                    row[1][1] = run_secs
                    kept.append(row)
            progress.advance(bar, len(part))
    text = "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in kept)
    atomic_write(records_file, lambda tmp: Path(tmp).write_text(text))
    return len(kept), len(rows) - len(kept)


def _heaviest(tasks: list, db: ms.database.Database, count: int) -> list:
    return sorted(tasks, key=lambda t: t.weight * _best_seconds(t, db), reverse=True)[:count]


def _best_seconds(task, db: ms.database.Database) -> float:
    best = db.get_top_k(db.commit_workload(task.dispatched[0]), 1)
    return _mean(best[0].run_secs) if best else 0.0


def _mean(run_secs) -> float:
    return sum(float(s) for s in run_secs) / len(run_secs) if run_secs else float("inf")


def prune(path: Path, keep: int = 2) -> None:
    """Keep the `keep` fastest records of each workload (the database holds every trial, ~14 KB each), one
    per schedule (the rule timed again is the same trace)."""
    records_file = Path(path) / "database_tuning_record.json"
    by_workload: dict[int, dict[str, tuple[float, str]]] = {}
    for line in records_file.read_text().splitlines():
        workload, (trace, run_secs, *_rest) = json.loads(line)
        seen = by_workload.setdefault(workload, {})
        key = json.dumps(trace)
        if key not in seen or _mean(run_secs) < seen[key][0]:
            seen[key] = (_mean(run_secs), line)
    kept = [line for rows in by_workload.values() for _, line in sorted(rows.values(), key=lambda r: r[0])[:keep]]
    atomic_write(records_file, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))


def _tasks(fused: tvm.IRModule, target: Target) -> list:
    """MetaSchedule tasks: the kernels that reduce and are not scheduled already (the integer kernels are)."""
    return [t for t in ms.relax_integration.extract_tasks(fused, target.tvm)
            if not any(_scheduled(f) or _injective(f) for f in t.dispatched[0].functions.values())]


def _scheduled(func) -> bool:
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled"))


def _injective(func: tvm.tirx.PrimFunc) -> bool:
    sch = s_tir.Schedule(func)
    return all(int(v.iter_type) == tvm.tirx.IterVar.DataPar
               for b in sch.get_child_blocks(sch.get_sblock("root")) for v in sch.get(b).iter_vars)


def schedule_untuned(func: tvm.tirx.PrimFunc, parallel_min: int = 4096) -> tvm.tirx.PrimFunc:
    """The fixed rule for a kernel without a tuning record (see `rule`), for the current target."""
    return rule(func, parallel_min).mod["main"].with_attr("tirx.is_scheduled", True)


def rule(func: tvm.tirx.PrimFunc, parallel_min: int = 4096, registers: Registers | None = None) -> s_tir.Schedule:
    """The fixed rule, as a traced schedule: elementwise stages are inlined into their consumers (into a
    reduction only where `_inlinable`), every reduction is tiled by `_tile_reduction` (which also computes the
    epilogue in its write-back), and every other loop nest becomes parallel rows of one vectorized row
    (`_vectorize_rows`). The register tile is sized for `registers` (default: the current target's)."""
    registers = registers or Registers.of(tvm.target.Target.current(allow_none=True))
    sch = s_tir.Schedule(func)
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root)[:-1]:
        if _inlinable(sch, block):
            try:
                sch.compute_inline(block)
            except s_tir.ScheduleError:    # an output of a multi-output kernel
                pass
    for name in [sch.get(b).name_hint for b in sch.get_child_blocks(root)]:
        if name not in [sch.get(b).name_hint for b in sch.get_child_blocks(root)]:
            continue        # an epilogue `_tile_reduction` computed in its write-back
        trial = sch.copy()
        block = trial.get_sblock(name)
        try:
            if _reduces(trial, block):
                _tile_reduction(trial, block, registers)
            else:
                _vectorize_rows(trial, block, parallel_min)
            sch = trial
        except (s_tir.ScheduleError, ValueError):     # a nest the rule does not cover: left as lowered
            pass
    return sch


def _inlinable(sch: s_tir.Schedule, block) -> bool:
    """An elementwise stage goes into its consumers, but into a reduction only where that adds no scalar branch
    per multiply-add: a plain copy (a 1x1 conv's unpadded `pad_temp`), or a stage that passes its last axis
    through (padding only H and W of NHWC) read by every reduction along its vector axis: a depthwise conv's
    channels, one bounds check per vector (the padded copy, written and read again, made EfficientNet-Lite0's
    stride-2 3x3 depthwise conv 2x slower). A dense conv's padded input stays a pass of its own (read one
    broadcast scalar at a time), and so does a padding or dilation of the last axis (NCHW's W: a branch per
    lane; the transposed convs of MQE's gradient module 15x slower inlined)."""
    if _reduces(sch, block):
        return False
    consumers = sch.get_consumers(block)
    if not any(_reduces(sch, c) for c in consumers):
        return True
    store = sch.get(block).body
    if isinstance(store, tvm.tirx.BufferStore) and isinstance(store.value, tvm.ir.expr.TensorLoad) \
            and all(a.same_as(b) for a, b in zip(store.indices, store.value.indices)):
        return True
    return _lane_uniform(store) and all(not _reduces(sch, c) or _reads_along_vector(sch, c, store.buffer)
                                        for c in consumers)


def _lane_uniform(store) -> bool:
    """Whether the stage, vectorized along its last axis, takes one branch per vector: its value is a load that
    passes the last index through, bare or under a condition that ignores it (NHWC's H and W padding)."""
    value, last = store.value, store.indices[-1] if store.indices else None
    if isinstance(value, tvm.ir.expr.Call) and value.op.name == "prim.if_then_else":
        if any(v.same_as(last) for v in tvm.tirx.analysis.undefined_vars(value.args[0])):
            return False
        value = value.args[1]
    return last is not None and isinstance(value, tvm.ir.expr.TensorLoad) and value.indices[-1].same_as(last)


def _reads_along_vector(sch: s_tir.Schedule, block, buffer) -> bool:
    """Whether `block` reads `buffer`'s last (contiguous) dimension along its own innermost spatial axis."""
    stmt = sch.get(block)
    last = [v.var for v in stmt.iter_vars if int(v.iter_type) == tvm.tirx.IterVar.DataPar][-1]
    return any(r.source.same_as(buffer) and last in _index_vars(r)[-1] for r in stmt.reads)


def _reduces(sch: s_tir.Schedule, block) -> bool:
    return any(int(v.iter_type) != tvm.tirx.IterVar.DataPar for v in sch.get(block).iter_vars)


def _lanes(width: int, most: int = 16) -> int | None:
    return next((v for v in (16, 8, 4) if v <= most and width % v == 0), None)


def _vectorize_rows(sch: s_tir.Schedule, block, parallel_min: int) -> None:
    """The loop nest becomes rows x one row. The row (the innermost loop of extent > 1) is vectorized: split
    into 16, 8 or 4 lanes, whole if short and odd, unrolled if shorter than 4 (a transpose's channels). The
    rows are fused and run parallel when the kernel is big enough to pay for waking the thread pool. Lanes
    never straddle two rows: fusing the whole nest leaves a div/mod per lane that LLVM cannot vectorize (10x
    slower on a 24-channel add, 16x on the input's NCHW -> NHWC transpose)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [int(sch.get(loop).extent) for loop in loops]
    cut = max((i for i, e in enumerate(extents) if e > 1), default=0)
    row = sch.fuse(*loops[cut:]) if len(loops) > cut + 1 else loops[cut]
    rows = (sch.fuse(*loops[:cut]) if cut > 1 else loops[0]) if math.prod(extents[:cut]) > 1 else None
    width = extents[cut]
    if width < 4:
        sch.unroll(row)
    else:
        lanes = _lanes(width)
        if lanes is None and width <= 64:
            vector = row
        else:
            chunks, vector = sch.split(row, [None, lanes or 16])
            rows = rows or chunks
        sch.vectorize(vector)
    if rows is not None and math.prod(extents) >= parallel_min:
        sch.parallel(rows)


def _tile_reduction(sch: s_tir.Schedule, block, registers: Registers, block_by: int = 4) -> None:
    """out[s...] += f(in[...], ...) over reduction axes r... (a conv, a transposed conv's gradient, a mean):
    the outer spatial axes run parallel; the innermost one is vectorized when an input's last (contiguous)
    dimension walks it (a constant weight is rewritten so, `_walk_last`); a spatial axis that input does not
    depend on (an NHWC conv's output columns, an NCHW one's output channels) is blocked and unrolled, so
    every vector loaded feeds several accumulators. The tile (columns x vectors, `_register_tile`) lives in
    a stack buffer LLVM keeps in registers across the reduction loops; the write-back applies the epilogue
    (bias, clamp, residual add) on the way out."""
    stmt = sch.get(block)
    axes = list(stmt.iter_vars)
    loops = sch.get_loops(block)
    spatial = sum(int(v.iter_type) == tvm.tirx.IterVar.DataPar for v in axes)
    if (len(loops) != len(axes) or not 0 < spatial < len(axes)
            or any(int(v.iter_type) != tvm.tirx.IterVar.DataPar for v in axes[:spatial])):
        raise ValueError("not spatial loops around reduction loops")
    outer, reduce = list(loops[:spatial]), loops[spatial:]
    extents = [int(sch.get(loop).extent) for loop in outer]
    axis = axes[spatial - 1].var
    walkers = _walkers(sch, block, axis)
    reads = sorted(sch.get(block).reads, reverse=True, key=lambda r: math.prod(
        int(d) if isinstance(d, tvm.tirx.IntImm) else 0 for d in r.source.shape))     # the largest buffer first
    uses = [_index_vars(r) for r in reads]
    contiguous = [u for r, u in zip(reads, uses) if axis in u[-1] or r.source in walkers]
    inner, row, blocked, factor = [], None, None, 1
    vectorized = extents[-1] >= 4 and bool(contiguous)
    for operand in contiguous if vectorized else uses[:1]:     # the largest first
        free = [i for i in reversed(range(len(outer) - vectorized)) if not any(axes[i].var in u for u in operand)]
        blocked = next((i for i in free if _block_factor(extents[i], block_by)), None)
        if blocked is not None:
            break
    if vectorized:
        factor, lanes, unit = _register_tile(extents[blocked] if blocked is not None else 1, extents[-1], registers,
                                             broadcast=len(contiguous) == 1)
        if lanes < extents[-1]:
            row, vector = sch.split(outer[-1], [None, lanes])
        else:
            vector = outer[-1]
        outer, inner = outer[:-1], (sch.split(vector, [None, unit]) if unit < lanes else [vector])
        _walk_last(sch, block, walkers, lanes if row is not None else None)
    elif blocked is not None:
        factor = _block_factor(extents[blocked], block_by)
    if factor == 1:
        blocked = None
    if blocked is not None:
        outer[blocked], block_axis = sch.split(outer[blocked], [None, factor])
        inner = [block_axis, *inner]
    # the largest operand is walked once: the loops it depends on go outermost, so a big weight's slice stays
    # in cache while every output position uses it (and a big input's rows while every channel block does)
    walked = set().union(*uses[0])
    spatial_loops = [(loop, axes[i].var) for i, loop in enumerate(outer)] + ([(row, axis)] if row is not None else [])
    outer = [loop for loop, var in sorted(spatial_loops, key=lambda lv: lv[1] not in walked)]
    sch.reorder(*outer, *reduce, *inner)
    if inner and outer:
        # "global", not "local": TVM keeps a small global buffer on the stack (LLVM promotes it to registers) but
        # lowers a local one to a TVMBackendAllocWorkspace call per tile (EfficientNet-Lite0's 1x1 convs 7-17%)
        write_back = sch.cache_write(block, 0, "global")
        sch.reverse_compute_at(write_back, outer[-1])
        if vectorized and unit < lanes:     # the write-back's vectors one register each too
            sch.split(sch.get_loops(write_back)[-1], [None, unit])
        for b in (block, write_back):     # registers: vectors of one register each, the rest unrolled
            nest = sch.get_loops(b)[-len(inner):]
            for loop in nest[:-1] if vectorized else nest:
                sch.unroll(loop)
            if vectorized:
                sch.vectorize(nest[-1])
        for epilogue in sch.get_consumers(write_back):    # bias, clamp, residual: applied on the way out
            try:
                sch.reverse_compute_inline(epilogue)
            except s_tir.ScheduleError:
                pass
    if outer and math.prod(extents) >= 64:     # the innermost loop stays out when the others are enough to share:
        shared = outer[:-1] if math.prod(int(sch.get(loop).extent) for loop in outer[:-1]) >= 64 else outer
        sch.parallel(sch.fuse(*shared) if len(shared) > 1 else shared[0])   # fused, it costs a div/mod per access
    sch.decompose_reduction(block, reduce[0])      # after the loop annotations: they need the init inside


def _index_vars(read) -> list[set]:
    """Per dimension of a block's read region: the loop variables its index uses."""
    return [set(tvm.tirx.analysis.undefined_vars(d.min)) for d in read.region]


def _register_tile(extent: int, width: int, registers: Registers, broadcast: bool = True) -> tuple[int, int, int]:
    """The accumulator tile: (columns, lanes, lanes per register). `columns` (a divisor of `extent`, up to 8)
    outputs share each weight vector; `lanes` (1-4 registers' worth, dividing `width`) output channels share
    each broadcast input (`broadcast`; a depthwise conv loads an input vector per accumulator instead, so
    more vectors save no loads: it takes one). The tile must fit the register file (accumulators, weight
    vectors, one input) and is scored by multiply-adds per load (Zen's FMA and load units keep pace at 1)
    and by independent accumulators (8 cover the FMA latency). AVX2: 4 x 24 lanes or 7 x 8 (7 x 16 spills an
    accumulator: 1.3x slower); AVX-512: 7 x 48 or 8 x 48; NEON aarch64: 7 x 12."""
    unit = next((u for u in (registers.floats, registers.floats // 2, registers.floats // 4)
                 if u >= 4 and width % u == 0), None)
    if unit is None:        # short or odd channel counts: one vector of 16, 8 or 4 lanes, or the whole row
        lanes = _lanes(width) or width
        return (_block_factor(extent, 4) or 1) if extent > 1 else 1, lanes, lanes
    def score(tile: tuple[int, int]) -> tuple:
        columns, vectors = tile
        accumulators = columns * vectors
        loads = (columns if broadcast else accumulators) + vectors
        return min(1.0, accumulators / loads) * min(1.0, accumulators / 8), accumulators, columns
    tiles = [(c, v) for c in range(1, 9) if extent % c == 0 for v in (range(1, 5) if broadcast else [1])
             if width % (v * unit) == 0 and c * v + v + 1 <= registers.count]
    columns, vectors = max(tiles, key=score)
    return columns, vectors * unit, unit


def _block_factor(extent: int, block_by: int) -> int | None:
    """`block_by` if it divides `extent`, else its largest divisor up to 2 x block_by (a 7x7 or 14x14 row: 7)."""
    if extent % block_by == 0 and extent > block_by:
        return block_by
    return next((d for d in range(2 * block_by, 1, -1) if extent % d == 0), None)


def _walkers(sch: s_tir.Schedule, block, axis: tvm.tirx.Var) -> dict:
    """The layout-free inputs (constant weights) that walk the dimension `axis` walks alone: buffer -> the
    read's dimensions in an order that puts that one last."""
    func = sch.mod["main"]
    free = [func.params[int(i)] for i in (func.attrs or {}).get("layout_free_buffers", [])]
    walkers = {}
    for read in sch.get(block).reads:
        uses = _index_vars(read)
        dims = [d for d, u in enumerate(uses) if axis in u]
        if any(read.source.same_as(b) for b in free) and len(dims) == 1 and uses[dims[0]] == {axis}:
            walkers[read.source] = [d for d in range(len(uses)) if d != dims[0]] + dims
    return walkers


def _walk_last(sch: s_tir.Schedule, block, walkers: dict, lanes: int | None) -> None:
    """Rewrite each weight of `walkers` so the dimension the vector walks is last: an NHWC conv's OHWI weight
    becomes HWIO, a depthwise one's C x kh x kw x 1 becomes kh x kw x 1 x C, so the output channels are
    contiguous. With `lanes` (the vector is one block of that dimension) it is also blocked, O/lanes x kh x kw
    x I x lanes, so the weights one block uses are contiguous too (a 3x3 conv's HWIO rows are 2 KB apart at
    512 channels). The copy is a layout-rewrite block, which the build splits out and folds into the
    constant (as for MetaSchedule's layouts)."""
    for index, read in enumerate(sch.get(block).reads):
        order = walkers.get(read.source)
        if order is None or (order == sorted(order) and lanes is None):
            continue
        copy = sch.cache_read(block, index, "global")
        sch.annotate(copy, "meta_schedule.layout_rewrite_preproc", True)
        sch.transform_layout(block, ("read", index), tvm.tirx.IndexMap.from_func(_layout(order, lanes), ndim=len(order)))


def _layout(order: list[int], lanes: int | None):
    def index(*i):
        rest, last = [i[d] for d in order[:-1]], i[order[-1]]
        return [*rest, last] if lanes is None else [last // lanes, *rest, last % lanes]
    return index


@tvm.ir.transform.module_pass(opt_level=0, name="ScheduleUntuned")
def ScheduleUntuned(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Give every PrimFunc that is not scheduled yet (no tuning record) the fixed rule of `schedule_untuned`."""
    todo = {gv: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and not _scheduled(f)}
    mod = copy_module(mod)      # a pass leaves its input as it was
    for gv, func in todo.items():
        mod[gv] = schedule_untuned(func)
    return mod


def _missing(tasks: list, db: ms.database.Database) -> list:
    """Tasks without a tuning record (a killed tuning run leaves workloads committed but unrecorded)."""
    return [t for t in tasks if not (db.has_workload(t.dispatched[0])
                                     and db.get_top_k(db.commit_workload(t.dispatched[0]), 1))]


def missing_tasks(fused: tvm.IRModule, target: Target, work_dir: Path) -> list[str]:
    """Names of the kernels of `fused` that have no tuning record."""
    return [t.task_name for t in _missing(_tasks(fused, target), _database(work_dir, target))]


def apply(fused: tvm.IRModule, target: Target, work_dir: Path) -> tvm.IRModule:
    """Replace every PrimFunc that has a tuning record with its best schedule; the others get the fixed rule
    (`schedule_untuned`)."""
    db = _database(work_dir, target)
    entries = [gv.name_hint for gv, f in fused.functions.items()
               if isinstance(f, relax.Function) and "global_symbol" in (f.attrs or {})]
    with target.tvm, db:
        return tvm.transform.Sequential([
            relax.transform.MetaScheduleApplyDatabase(enable_warning=False),
            ScheduleUntuned,
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.LiftTransformParams(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(entry_functions=entries),
        ])(fused)


def layer_kernels(scheduled: tvm.IRModule, layers: list) -> list[tvm.tirx.PrimFunc] | None:
    """The scheduled PrimFunc of each layer (its bias, clamp and residual add fused in), or None if some layer
    has no kernel. Fusion may reorder main's calls (a shortcut conv before the block's second conv), so a
    kernel is matched by its data and output shapes and its weight's size (a packed layout keeps it)."""
    calls = {}
    for binding in (b for block in scheduled["main"].body.blocks for b in block.bindings):
        value = binding.value
        if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.call_tir"):
            func = scheduled[value.args[0]]
            if any(("conv2d" in name or "matmul" in name) for name in _block_names(func)):
                args = [tuple(int(d) for d in a.ty.shape) for a in value.args[1].fields[:2]]
                if len(args) == 2:
                    key = (args[0], tuple(int(d) for d in value.ty.shape), math.prod(args[1]))
                    calls.setdefault(key, []).append(func)
    kernels = []
    for layer in layers:
        found = calls.get((tuple(layer.input_shape), tuple(layer.output_shape), math.prod(layer.weight_shape)))
        if not found:
            return None
        kernels.append(found.pop(0))
    return kernels


def _block_names(func: tvm.tirx.PrimFunc) -> list[str]:
    return re.findall(r'T\.sblock\("(\w+)"', func.script())


def main(argv: list[str] | None = None) -> int:
    """``python -m ohq_tvm.tune model.onnx [--trials 64] [--top-up 12]``: tune a model's FP32 kernels ahead of time."""
    from .cli import ArgumentParser, common_args, quiet_tvm_logs
    from .frontend import load_onnx, parse_shape
    from .target import parse_target

    parser = ArgumentParser(prog="python -m ohq_tvm.tune", description=main.__doc__)
    common_args(parser)
    parser.add_argument("--trials", type=int, default=32, help="MetaSchedule trials per kernel (default 32)")
    parser.add_argument("--top-up", type=int, default=0, metavar="N",
                        help="also give the N kernels that take the most time --trials more trials")
    parser.add_argument("--rule", action="store_true",
                        help="also time the fixed rule on the kernels that have records, and keep it where it is faster")
    parser.add_argument("--mqe", action="store_true", help="tune MQE's masked simulation of the model instead")
    parser.add_argument("--retime", action="store_true",
                        help="first time every record of the database again (records of an older runner)")
    args = parser.parse_args(argv)
    quiet_tvm_logs()
    target = parse_target(args.target, args.threads)
    if not target.native:
        raise OhqError(f"{target.key} is not this CPU: tuning runs kernels, so it runs on the target itself")
    imported = load_onnx(args.model, parse_shape(args.input_shape) if args.input_shape else None)
    mod = imported.mod
    if args.mqe:
        from .layers import find_layers
        from .mqe import masked_module
        mod = masked_module(mod, find_layers(mod)).mod
    if args.retime:
        timed, dropped = retime(args.work_dir, target)
        print(f"{timed} records re-timed, {dropped} dropped (no longer build or run)")
    stats = tune(fuse(mod, target), target, args.work_dir, args.trials, top_up=args.top_up, rule_everywhere=args.rule)
    print(f"{stats.tasks} kernels, {stats.tuned} tuned ({stats.trials} trials), the fixed rule fastest on "
          f"{stats.rule_best}; records in {database_dir(args.work_dir, target)}")
    return 0


if __name__ == "__main__":
    from .errors import run_cli
    run_cli(main)
