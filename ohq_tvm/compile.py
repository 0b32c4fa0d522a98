"""``python -m ohq_tvm.compile model.onnx --target llvm``: the OHQ flow, ONNX in, deployable ``.so`` out.

import -> schedule the FP32 kernels (MetaSchedule) -> measure every layer at every candidate on this
CPU (OQA) -> estimate each candidate's damage without data (MQE) -> pick one candidate per layer
(ILP) -> rewrite the graph with the chosen integer kernels -> build, time, report.

Python API::

    from ohq_tvm.compile import Options, compile_onnx
    result = compile_onnx("model.onnx", "llvm", options=Options(latency_budget="0.75"))
    result.export("model.so")
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from . import build, kernels, mqe, report, solve, tune
from .cli import ArgumentParser, common_args, input_range_arg, parse_bits, quiet_tvm_logs
from .errors import OhqError, run_cli
from .frontend import Imported, load_onnx, parse_shape, run_onnxruntime
from .layers import Layer, find_layers, layer_table
from .measure import Measurer, TuningLog, candidates_for_bits, measure_model, rpc_runner
from .rewrite import LayerPlan, QuantizeLayers, hollow
from .target import Target, parse_target

LAYER_OPS = ("Conv", "Gemm", "MatMul")    # the ONNX operators the layer table draws from
LINK_FLOOR = 1.1        # a FP32 layer between integer ones counts at least this x its W8A8 latency (_problem)
SIMULATION_TRIALS = 8    # MetaSchedule trials per kernel of MQE's simulation: it only has to be fast enough


@dataclass(frozen=True)
class Options:
    """What the flow may choose and how it judges the choice."""
    bits: tuple[int, ...] = (8, 4, 2, 1)        # allowed weight / activation bit-widths
    latency_budget: str | None = None           # "0.75" (of uniform INT8, predicted) or "12.5ms"; None: the fastest
                                                # configuration whose whole-model estimated loss is <= max_loss x INT8
    size_budget: int | None = None              # weight bytes
    exclude: tuple[str, ...] = ()               # "conv2d0" (kept FP32) or "conv2d0=W8A8"
    uniform: str | None = None                  # one candidate for every layer, no solving ("FP32": no quantization)
    config: dict[str, str] | None = None        # a given per-layer choice (e.g. a previous run's sidecar)
    sensitivity: str = "mqe"
    max_loss: float | None = None               # whole-model estimated loss at most this x uniform INT8's
                                                # (default 1 without a latency budget, unchecked with one)
    calibration_data: str | Path | None = None
    input_range: tuple[float, float] | None = None   # the model input's bounds (e.g. -1, 1), when known: the
                                                # data-free inputs stay in them
    samples: int = 8
    seed: int = 0
    tune_trials: int = 32                       # MetaSchedule trials per kernel missing from the logs
    pareto: int = 8                             # budgets swept for the report's Pareto front
    baselines: bool = True                      # also build and time FP32 and uniform INT8 (report)
    rpc: tuple[str, str] | None = None          # (tracker HOST:PORT, key): measure on a board


@dataclass
class Compiled:
    imported: Imported
    layers: list[Layer]
    target: Target
    executable: object                     # relax.VMExecutable
    tune_stats: tune.TuneStats
    stage_seconds: dict[str, float] = field(default_factory=dict)
    report: report.Report | None = None
    records: list[dict] = field(default_factory=list)   # the rewrite's per-layer kernels and scales

    def export(self, output: str | Path, force: bool = False, model_name: str = "model") -> list[Path]:
        """The .so, and for a quantized module its sidecar and reports, each written atomically."""
        output = Path(output)
        build.export(self.executable, output, self.target, force=force)
        written = [output]
        if self.report is not None:
            sidecar = output.with_suffix(".quant.json")
            report.write_text(sidecar, json.dumps({
                "model": model_name, "target": self.target.key, "config": self.report.config,
                "layers": self.records}, indent=1) + "\n")
            written += [sidecar, *report.write(self.report, output)]
        return written


@contextmanager
def _stage(stages: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - t0


def _time_ms(executables: list, shape: tuple[int, ...], threads: int, rounds: int = 5) -> list[float]:
    """Latency of each deployable library, exported, loaded and timed side by side like a user's, in a fresh
    process (running the executable in place would also make a later export of it warn)."""
    import tempfile
    from .runtime import time_in_fresh_process
    with tempfile.TemporaryDirectory() as tmp:
        paths = [f"{tmp}/m{i}.so" for i in range(len(executables))]
        for executable, path in zip(executables, paths):
            executable.export_library(path)
        return time_in_fresh_process(paths, shape, threads, rounds)


def parse_exclude(items: tuple[str, ...], layers: list[Layer]) -> dict[str, frozenset[str]]:
    ids = {layer.id for layer in layers}
    allowed = {}
    for item in items:
        lid, _, config = item.partition("=")
        if lid not in ids:
            raise OhqError(f"--exclude {item}: no layer {lid!r} (layer ids: {', '.join(sorted(ids))})")
        name = config.upper() or "FP32"
        if name not in ("FP32", "W8A8"):
            raise OhqError(f"--exclude {item}: an excluded layer is kept at FP32 or W8A8, not {config}")
        allowed[lid] = frozenset({name})
    return allowed


class Flow:
    """The stages of one compilation, sharing the imported model, target, logs and stage timings."""

    def __init__(self, model: Path, target: Target, imported: Imported, work_dir: Path, options: Options,
                 console: Console) -> None:
        self.model, self.target, self.imported, self.options = model, target, imported, options
        self.work_dir, self.console = Path(work_dir), console
        self.layers = find_layers(imported.mod)
        self.tuned = 0

    def schedule(self, mod) -> object:
        """Fuse, tune what the logs miss, apply the records: the module ready to compile."""
        fused = tune.fuse(mod, self.target)
        with self.console.status(f"scheduling kernels for {self.target.key} (MetaSchedule)"):
            stats = tune.tune(fused, self.target, self.work_dir, self.options.tune_trials if self.target.native else 0)
            self.tuned += stats.tuned
            self.stats = stats
            return tune.apply(fused, self.target, self.work_dir)

    def measure(self, configs, fp32_scheduled) -> dict[str, dict[str, dict]]:
        """OQA: layer id -> candidate -> {"ms", "knobs"} (unavailable candidates absent)."""
        runner = rpc_runner(*self.options.rpc, 60) if self.options.rpc else None
        fp32 = tune.layer_kernels(fp32_scheduled, self.layers)
        if fp32 is None:
            self.console.print("[yellow]FP32 kernels not matched to layers: FP32 not timed")
        log = TuningLog(self.work_dir / self.target.key / "oqa.jsonl", self.target)
        from rich.progress import Progress
        with Progress(console=self.console, transient=True) as progress, Measurer(self.target, runner) as measurer:
            unique = len({layer.workload for layer in self.layers})
            task = progress.add_task("OQA: measuring", total=unique * len(configs))
            result = measure_model(self.layers, fp32, configs, measurer, log,
                                   lambda what: progress.update(task, advance=1, description=f"OQA: {what}"))
        self.console.print(f"OQA: {result.builds} builds, {result.measurements} measurements in {result.seconds:.1f} s")
        return {t.layer.id: {name: {"ms": ms, "knobs": t.knobs.get(name)} for name, ms in t.ms.items()
                             if ms is not None} for t in result.layers}

    @property
    def mqe_dir(self) -> Path:
        return self.work_dir / self.host.cpu_key / "mqe"

    def estimate(self, configs) -> mqe.Sensitivity:
        """MQE scores and activation ranges; cached in the work dir (a result depends only on its inputs),
        distilled inputs too (`mqe.distill`: the whole-model check scores on them)."""
        host = self.host
        o = self.options
        key = mqe.cache_key(self.model, configs, o.sensitivity, o.samples, o.seed, o.calibration_data,
                            kernels.isa_of(host.tvm).reduce_range, o.input_range)
        cache = self.mqe_dir / f"{key}.json"
        if cache.is_file():
            try:
                return mqe.Sensitivity.from_json(json.loads(cache.read_text()))
            except (ValueError, KeyError, TypeError, OSError):
                self.console.print(f"[yellow]{cache}: corrupt MQE cache ignored")
        with self.console.status(f"MQE: {o.sensitivity} over {len(self.layers)} layers"):
            result = mqe.estimate(self.model, self.imported, self.layers, configs, host, method=o.sensitivity,
                                  calibration_data=o.calibration_data, samples=o.samples, seed=o.seed,
                                  work_dir=self.work_dir, tune_trials=min(o.tune_trials, SIMULATION_TRIALS),
                                  distill_cache=self.mqe_dir, input_range=o.input_range)
        cache.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(cache, json.dumps(result.to_json()))
        return result

    def mix_loss(self, sens: mqe.Sensitivity) -> mqe.MixLoss:
        """The whole-model check of a configuration, on the inputs MQE scored with."""
        o = self.options
        x = sens.inputs
        if x is None:     # scores from the cache
            x, pick, _ = mqe.scoring_inputs(self.model, self.imported.input_shape, o.calibration_data,
                                            o.samples, o.seed, macs=sum(layer.macs for layer in self.layers),
                                            distill_cache=self.mqe_dir, input_range=o.input_range)
            x = x[pick]
        sim = sens.simulation     # built by this compile's MQE run, or not yet (scores from the cache)
        if sim is None:
            with self.console.status("MQE: building the whole-model check"):
                sim = mqe.Simulation(self.imported, self.layers, self.host, self.work_dir,
                                     min(o.tune_trials, SIMULATION_TRIALS))
        return mqe.MixLoss(sim, self.layers, sens.calibration, x, kernels.isa_of(self.host.tvm).reduce_range)

    @property
    def host(self) -> Target:
        """Where MQE's simulation runs: this CPU (the target itself when it is this CPU)."""
        return self.target if self.target.native else parse_target("llvm", self.target.threads)

    def plan(self, config: dict[str, str], timings: dict, calibration: mqe.Calibration) -> dict[str, LayerPlan]:
        isa = kernels.isa_of(self.target.tvm)
        plans = {}
        for layer in self.layers:
            name = config[layer.id]
            if name == "FP32":
                continue
            cand = kernels.parse_config(name)
            if kernels.family(layer, cand) is None:
                raise OhqError(f"{layer.id} ({layer.kind}) has no {name} kernel")
            knobs = (timings.get(layer.id, {}).get(name) or {}).get("knobs")
            knobs = kernels.Knobs(*knobs) if knobs else kernels.knob_space(layer, cand, isa)[0]
            plans[layer.id] = LayerPlan(cand, knobs, tuple(calibration.ranges[layer.id]),
                                        calibration.means.get(layer.id))
        return plans

    def build(self, plans: dict[str, LayerPlan], rest: bool = False) -> tuple[object, list[dict], object | None]:
        """The module of `plans`, the rewrite's records and, with `rest`, the same module with its integer
        kernels emptied (rewrite.hollow): timed, the rest of the network."""
        rewrite = QuantizeLayers(plans, self.target.tvm)
        scheduled = self.schedule(rewrite(self.imported.mod))
        executable = build.compile_module(scheduled, self.target)
        return executable, rewrite.records, build.compile_module(hollow(scheduled), self.target) if rest else None

    def time(self, *executables, rounds: int = 5) -> list[float | None]:
        if not self.target.native:
            return [None] * len(executables)
        return _time_ms(list(executables), self.imported.input_shape, self.target.threads, rounds)

    def uniform(self, name: str) -> dict[str, str]:
        """`name` for every layer that has that kernel, FP32 for the others."""
        cand = kernels.parse_config(name)
        return {layer.id: name if cand.family == "fp32" or kernels.family(layer, cand) else "FP32"
                for layer in self.layers}


def _options_table(timings: dict, scores: dict[str, dict[str, float]], layers: list[Layer]) -> dict[str, dict]:
    """layer id -> candidate -> {"ms", "loss"}: what the solver may pick (measured and estimated)."""
    table = {}
    for layer in layers:
        row = {name: {"ms": t["ms"], "loss": scores.get(layer.id, {}).get(name)}
               for name, t in timings.get(layer.id, {}).items()}
        table[layer.id] = {name: v for name, v in row.items() if v["loss"] is not None}
    return table


def _problem(table: dict[str, dict], layers: list[Layer], rest_ms: float,
             allowed: dict[str, frozenset[str]]) -> solve.Problem:
    """predicted ms = the measured rest of the network + the chosen kernels' OQA latencies."""
    options = {}
    for layer in layers:
        row = dict(table[layer.id])
        if (layer.codes_in or layer.codes_out) and "FP32" in row and "W8A8" in row:
            # A FP32 layer amid integer ones costs its neighbours their integer links (a quantize and a
            # dequantize pass), which its own timing does not see: count it slower than W8A8 (a floor;
            # on EfficientNet-Lite0 such depthwise layers ran slower in FP32 although timed faster alone).
            row["FP32"] = {**row["FP32"], "ms": max(row["FP32"]["ms"], LINK_FLOOR * row["W8A8"]["ms"])}
        options[layer.id] = [solve.Option(name, v["ms"], v["loss"],
                                          layer.weight_bytes(kernels.parse_config(name).wbits))
                             for name, v in row.items()]
    return solve.Problem(options, rest_ms, allowed=allowed)


def compile_onnx(model: str | Path, target: str | Target = "llvm", *, input_shape: tuple[int, ...] | None = None,
                 work_dir: str | Path = "tuning_logs", options: Options = Options(), threads: int | None = None,
                 console: Console | None = None) -> Compiled:
    """The whole flow. `options.uniform == "FP32"` compiles the FP32 model (every kernel scheduled)."""
    console = console or Console(stderr=True, quiet=True)
    target = target if isinstance(target, Target) else parse_target(target, threads)
    model = Path(model)
    stages: dict[str, float] = {}
    with _stage(stages, "import"):
        imported = load_onnx(model, input_shape)
    flow = Flow(model, target, imported, Path(work_dir), options, console)
    allowed = parse_exclude(options.exclude, flow.layers)
    with _stage(stages, "schedule FP32"):
        fp32_scheduled = flow.schedule(imported.mod)
    if options.uniform and options.uniform.upper() == "FP32":
        with _stage(stages, "build"):
            executable = build.compile_module(fp32_scheduled, target)
        return Compiled(imported, flow.layers, target, executable, flow.stats, stages)
    if not flow.layers:
        raise OhqError(f"{model}: no conv2d or matmul layer with constant weights to quantize; "
                       "compile it with --uniform FP32")

    configs = candidates_for_bits(options.bits)
    if options.uniform:
        configs = [kernels.parse_config("FP32"), kernels.parse_config(options.uniform)]
    elif kernels.parse_config("W8A8") not in configs:
        configs.append(kernels.parse_config("W8A8"))      # the reference the budget is a fraction of
    fixed_choice = options.config or (flow.uniform(options.uniform) if options.uniform else None)
    if fixed_choice is not None:
        unknown = set(fixed_choice) ^ {layer.id for layer in flow.layers}
        if unknown:
            raise OhqError(f"--config does not match the model's layers: {', '.join(sorted(unknown))}")
    need_timings = fixed_choice is None or (options.baselines and target.native)
    if need_timings and not target.native and options.rpc is None:
        raise OhqError(f"{target.key} is not this CPU: measuring it needs --rpc-tracker and --rpc-key "
                       "(or give --uniform CANDIDATE or --config FILE to skip measuring)")
    timings = {}
    if need_timings:
        with _stage(stages, "measure"):
            timings = flow.measure(configs, fp32_scheduled)
    with _stage(stages, "mqe"):
        sens = flow.estimate(configs)
    table = _options_table(timings, sens.scores, flow.layers) if timings else {}

    fp32_ms = uniform_ms = None
    rest_ms = 0.0      # the latency outside the quantized layers; unknown (0) on a target this CPU cannot time
    int8 = flow.uniform("W8A8")
    if options.baselines and target.native:
        with _stage(stages, "baselines"):
            fp32_exe = build.compile_module(fp32_scheduled, target)
            int8_exe, int8_records, rest_exe = flow.build(flow.plan(int8, timings, sens.calibration), rest=True)
            fp32_ms, uniform_ms, rest_ms = flow.time(fp32_exe, int8_exe, rest_exe)
    layer_ms = lambda choice: sum(table[lid][name]["ms"] for lid, name in choice.items()   # noqa: E731
                                  if name in table.get(lid, {}))

    budget_ms, front, mix, int8_mix = None, [], None, None
    solver_rest_ms = rest_ms       # the rest the latency model (and so the budget) was solved with
    with _stage(stages, "solve"):
        if fixed_choice is not None:
            choice = dict(fixed_choice)
        else:
            problem = _problem(table, flow.layers, rest_ms, allowed)
            check = flow.mix_loss(sens)
            int8_mix = check(int8)
            limit = (1.0 if options.max_loss is None else options.max_loss) * int8_mix
            if options.latency_budget is None:     # as fast as possible at no more estimated loss than INT8
                solution = solve.fastest_checked(problem, lambda c: check(c) <= limit, int8, options.size_budget)
            else:
                # a fraction of uniform INT8 as the model predicts it: the model's own scale, steadier than one
                # noisy timing of the module
                reference = rest_ms + layer_ms(int8)
                budget_ms = solve.parse_budget(options.latency_budget, reference)
                solution = solve.solve(problem, budget_ms, options.size_budget)
                if options.max_loss is not None and check(solution.config) > limit:
                    passing = solve.fastest_checked(problem, lambda c: check(c) <= limit, int8, options.size_budget)
                    raise OhqError(
                        f"within {budget_ms:.3f} ms the least damaging configuration has an estimated whole-model "
                        f"loss of {check(solution.config):.3g}, over --max-loss {options.max_loss:g} x uniform "
                        f"INT8's ({int8_mix:.3g}); the fastest configuration within it is predicted at "
                        f"{passing.ms:.3f} ms")
            choice = solution.config
            mix = check(choice)
            if options.pareto > 1:
                front = [{"ms": s.ms, "loss": s.loss, "config": s.config}
                         for s in solve.pareto(problem, options.pareto, options.size_budget)]

    with _stage(stages, "build"):
        if options.baselines and target.native and choice == int8:
            executable, records = int8_exe, int8_records
        else:
            executable, records, _ = flow.build(flow.plan(choice, timings, sens.calibration))
    with _stage(stages, "time"):
        measured = None
        if options.baselines and target.native:     # the final figures: all four modules side by side
            fp32_ms, uniform_ms, rest_ms, measured = flow.time(fp32_exe, int8_exe, rest_exe, executable)
    notes: list[str] = []
    asked_faster = fixed_choice is None and measured is not None and uniform_ms is not None and choice != int8 \
        and (budget_ms is None or budget_ms < uniform_ms)
    if asked_faster and measured > 1.02 * uniform_ms:
        with _stage(stages, "time"):    # one timing can catch a noisy spell: confirm on a longer one
            measured, uniform_ms = flow.time(executable, int8_exe, rounds=15)
    if asked_faster and measured > 1.02 * uniform_ms:
        # The latency model is per layer; the network is what counts: never ship slower than uniform INT8
        # when asked to be faster than it.
        changed = ", ".join(f"{lid} {name}" for lid, name in choice.items() if name != int8[lid])
        notes.append(f"the solver's configuration ({changed}; the rest as uniform INT8) measured {measured:.3f} ms, "
                     f"slower than uniform INT8 ({uniform_ms:.3f} ms): uniform INT8 is shipped instead")
        choice, executable, records, measured = int8, int8_exe, int8_records, uniform_ms
        mix = int8_mix
    def predicted(config: dict[str, str], rest: float) -> float | None:
        known = table and all(name in table.get(lid, {}) for lid, name in config.items())
        return rest + layer_ms(config) if known else None
    choices = [report.layer_choice(layer, choice[layer.id], table[layer.id]) if choice[layer.id] in table.get(
        layer.id, {}) else report.LayerChoice(layer.id, layer.kind, choice[layer.id], math.nan, math.nan, {})
        for layer in flow.layers]
    objective = ("given configuration" if fixed_choice is not None else
                 f"least estimated loss within {budget_ms:.3f} ms" if budget_ms is not None else
                 "fastest with no more estimated whole-model loss than uniform INT8"
                 + (f" x {options.max_loss:g}" if options.max_loss is not None else ""))
    if mix is not None and int8_mix and mix > 3 * int8_mix:
        notes.append(f"estimated whole-model loss {mix:.3g} is {mix / int8_mix:.0f}x uniform INT8's ({int8_mix:.3g}): "
                     "expect a large accuracy drop (--max-loss bounds it)")
    # the choice as the solver predicted it (within the budget); the latency check of uniform INT8 takes the rest
    # timed beside the final modules
    rep = report.Report(model.stem, target.key, target.threads, objective, budget_ms, choice,
                        predicted(choice, solver_rest_ms),
                        measured, uniform_ms, fp32_ms, rest_ms, sum(c.loss for c in choices if not math.isnan(c.loss)),
                        f"{sens.method}, {sens.calibration.source} inputs", choices, front, stages, notes,
                        kept_fp32(imported.ops, len(flow.layers), records), mix_loss=mix, int8_mix_loss=int8_mix,
                        int8_predicted_ms=predicted(int8, rest_ms) if uniform_ms is not None else None)
    stats = tune.TuneStats(flow.stats.tasks, flow.tuned, 0, flow.stats.untuned)
    return Compiled(imported, flow.layers, target, executable, stats, stages, rep, records)


ABSORBED = {"relu": "Relu", "clip": "Clip", "maximum": "Clip", "minimum": "Clip"}   # epilogue op -> ONNX op


def kept_fp32(ops: tuple[str, ...], quantized: int, records: list[dict] = ()) -> dict[str, int]:
    """ONNX operators the flow leaves in FP32 (op type -> count), incl. convs / matmuls without constant weights;
    activations absorbed into an integer kernel's epilogue (`records`, the sidecar's layers) are not."""
    counts = Counter(op for op in ops if op not in LAYER_OPS and op != "BatchNormalization")  # BN: folded
    for record in records:
        for op in {ABSORBED[o] for o in record["epilogue"] if o in ABSORBED}:
            counts[op] -= counts[op] > 0
    unquantized = sum(op in LAYER_OPS for op in ops) - quantized
    if unquantized > 0:
        counts["Conv/MatMul without constant weights"] = unquantized
    return {op: n for op, n in counts.items() if n}


def _read_config(path: Path) -> dict[str, str]:
    try:
        config = json.loads(Path(path).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OhqError(f"--config {path}: not a readable sidecar with a \"config\" object ({e})") from None
    for lid, name in config.items():
        try:
            kernels.parse_config(name)
        except ValueError as e:
            raise OhqError(f"--config {path}: layer {lid}: {e}") from None
    return {str(k): str(v).upper() for k, v in config.items()}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m ohq_tvm.compile", description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--output", "-o", type=Path, help="output .so (default: ./<model name>.so)")
    parser.add_argument("--bits", default="8,4,2,1", help="allowed weight/activation bit-widths (default 8,4,2,1)")
    parser.add_argument("--latency-budget", help="a fraction of the predicted uniform-INT8 latency (e.g. 0.75) or ms (e.g. "
                                                 "12.5ms); default: the fastest configuration whose estimated "
                                                 "whole-model loss is at most uniform INT8's")
    parser.add_argument("--size-budget", type=int, help="total weight bytes of the quantizable layers")
    parser.add_argument("--max-loss", type=float, metavar="RATIO",
                        help="estimated whole-model loss (KL vs FP32 on MQE's inputs, every layer quantized as chosen) "
                             "at most RATIO x uniform INT8's; default 1 without a latency budget; with one, a "
                             "budget the least damaging configuration breaks it in is an error")
    parser.add_argument("--exclude", action="append", default=[], metavar="LAYER[=W8A8]",
                        help="keep a layer at FP32 (or W8A8); repeatable")
    parser.add_argument("--uniform", help="one candidate for every layer, e.g. W8A8; FP32 = no quantization")
    parser.add_argument("--config", type=Path, help="per-layer choice from a sidecar (<output>.quant.json)")
    parser.add_argument("--sensitivity", default="mqe", choices=mqe.METHODS[:3], help="estimator (default mqe)")
    parser.add_argument("--calibration-data", type=Path, help="folder of images, .npy or .npz (default: data-free)")
    input_range_arg(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pareto", type=int, default=8, help="budgets swept for the report's Pareto front")
    parser.add_argument("--no-baselines", action="store_true",
                        help="skip building and timing the FP32 and uniform-INT8 modules")
    parser.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on its boards")
    parser.add_argument("--rpc-key", help="device key of the boards at the tracker")
    parser.add_argument("--tune-trials", type=int, default=32,
                        help="MetaSchedule trials for each kernel missing from the tuning logs (0: no tuning)")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise OhqError("--threads must be >= 1")
    if args.tune_trials < 0:
        raise OhqError("--tune-trials must be >= 0")
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise OhqError("--rpc-tracker and --rpc-key go together")
    if args.max_loss is not None and not args.max_loss > 0:
        raise OhqError(f"--max-loss must be positive, got {args.max_loss}")
    if args.size_budget is not None and args.size_budget <= 0:
        raise OhqError(f"--size-budget must be positive, got {args.size_budget}")
    bits = parse_bits(args.bits)
    if args.uniform:
        try:
            args.uniform = kernels.parse_config(args.uniform).name
        except ValueError as e:
            raise OhqError(f"--uniform: {e}") from None
    if args.latency_budget is not None:
        solve.parse_budget(args.latency_budget, 1.0)     # reject malformed budgets before any work
    quiet_tvm_logs()
    console = Console(stderr=True)
    target = parse_target(args.target, args.threads)
    if not target.native:
        target.require_cross_compiler()
    output = args.output or Path(args.model.stem + ".so")
    if output.exists() and not args.force:
        raise OhqError(f"{output} exists; pass --force to overwrite it")
    options = Options(bits=bits, latency_budget=args.latency_budget, size_budget=args.size_budget,
                      max_loss=args.max_loss,
                      exclude=tuple(args.exclude), uniform=args.uniform,
                      config=_read_config(args.config) if args.config else None, sensitivity=args.sensitivity,
                      calibration_data=args.calibration_data, input_range=args.input_range, seed=args.seed,
                      tune_trials=args.tune_trials,
                      pareto=args.pareto, baselines=not args.no_baselines,
                      rpc=(args.rpc_tracker, args.rpc_key) if args.rpc_tracker else None)

    result = compile_onnx(args.model, target, input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                          work_dir=args.work_dir, options=options, console=console)
    out = Console()
    if result.report is None:
        out.print(layer_table(result.layers))
    else:
        out.print(report.choice_table(result.report))
        for line in report.summary_lines(result.report):
            out.print(line)
    stats = result.tune_stats
    console.print(f"kernels: {stats.tasks}, tuned now: {stats.tuned}, from logs: "
                  f"{stats.tasks - stats.tuned - stats.untuned}, without a record (fixed rule): {stats.untuned}")
    t0 = time.perf_counter()
    written = result.export(output, force=args.force, model_name=args.model.stem)
    result.stage_seconds["export"] = time.perf_counter() - t0

    if target.native and result.report is None:
        from .runtime import Model
        x = np.random.default_rng(0).standard_normal(result.imported.input_shape, dtype=np.float32)
        diff = float(np.abs(Model.load(output)(x) - run_onnxruntime(args.model, x)).max())
        console.print(f"max |ours - onnxruntime| on a random input: {diff:.2e}")
    console.print(f"wrote {', '.join(map(str, written))}  "
                  f"({', '.join(f'{k} {v:.1f}s' for k, v in result.stage_seconds.items())})")
    return 0


if __name__ == "__main__":
    run_cli(main)
