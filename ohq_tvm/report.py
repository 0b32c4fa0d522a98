"""What the compiler chose and why: a per-layer table, ``<output>.report.json``, ``.report.md``, plots."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .build import atomic_write
from .layers import Layer


@dataclass(frozen=True)
class LayerChoice:
    id: str
    kind: str
    config: str                       # chosen candidate
    ms: float                         # its measured kernel latency
    loss: float                       # its estimated sensitivity
    candidates: dict[str, dict]       # name -> {"ms", "loss"} of every available candidate


@dataclass
class Report:
    model: str
    target: str
    threads: int
    objective: str                    # what the solver optimized, under which budget
    budget_ms: float | None
    config: dict[str, str]
    predicted_ms: float | None
    measured_ms: float | None
    uniform_int8_ms: float | None
    fp32_ms: float | None
    fixed_ms: float                   # latency outside the quantized layers: uniform INT8 with its kernels emptied
    estimated_loss: float
    sensitivity: str                  # estimator name and input source
    layers: list[LayerChoice]
    pareto: list[dict] = field(default_factory=list)     # [{"ms", "loss", "config"}] along the front
    stage_seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)       # e.g. a fallback the flow took after measuring
    kept_fp32: dict[str, int] = field(default_factory=dict)  # ONNX operators not quantized: op type -> count
    mix_loss: float | None = None     # estimated KL from FP32 with every layer quantized as chosen (MQE inputs)
    int8_mix_loss: float | None = None   # the same for uniform INT8
    int8_predicted_ms: float | None = None   # OQA's latency check: fixed_ms + the layers' W8A8 kernel timings

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def prediction_error(self) -> float | None:
        if self.predicted_ms is None or not self.measured_ms:
            return None
        return self.predicted_ms / self.measured_ms - 1


def choice_table(report: Report):
    from rich.table import Table
    table = Table(title=f"{report.model} on {report.target}: chosen candidate per layer "
                        f"(ms = measured kernel latency, loss = {report.sensitivity})")
    for column in ("layer", "kind", "chosen", "ms", "loss", "W8A8 ms", "FP32 ms"):
        table.add_column(column, justify="left" if column in ("layer", "kind", "chosen") else "right")
    cell = lambda d, key: "-" if d is None or d.get(key) is None else f"{d[key]:.4g}"   # noqa: E731
    for c in report.layers:
        table.add_row(c.id, c.kind, c.config, f"{c.ms:.4f}", f"{c.loss:.3g}",
                      cell(c.candidates.get("W8A8"), "ms"), cell(c.candidates.get("FP32"), "ms"))
    return table


def summary_lines(report: Report) -> list[str]:
    fmt = lambda v: "-" if v is None else f"{v:.3f} ms"   # noqa: E731
    lines = [f"predicted {fmt(report.predicted_ms)}, measured {fmt(report.measured_ms)}"
             + (f" (prediction error {report.prediction_error:+.1%})" if report.prediction_error is not None else ""),
             f"uniform INT8 {fmt(report.uniform_int8_ms)}, FP32 {fmt(report.fp32_ms)}"]
    if report.int8_predicted_ms is not None and report.uniform_int8_ms:
        error = report.int8_predicted_ms / report.uniform_int8_ms - 1
        lines.append(f"latency check: uniform INT8 predicted {fmt(report.int8_predicted_ms)} (its layers' OQA timings + "
                     f"the rest of the network, {fmt(report.fixed_ms)}), measured {fmt(report.uniform_int8_ms)}: "
                     f"error {error:+.1%}")
    if report.mix_loss is not None:
        lines.append(f"estimated whole-model loss (KL vs FP32) {report.mix_loss:.3g}, uniform INT8 "
                     f"{report.int8_mix_loss:.3g}")
    if report.measured_ms and report.uniform_int8_ms:
        lines.append(f"mixed / uniform INT8 = {report.measured_ms / report.uniform_int8_ms:.3f}x")
    if report.measured_ms and report.fp32_ms:
        lines.append(f"mixed / FP32 = {report.measured_ms / report.fp32_ms:.3f}x")
    counts: dict[str, int] = {}
    for config in report.config.values():
        counts[config] = counts.get(config, 0) + 1
    lines.append("layers: " + ", ".join(f"{n} x {c}" for c, n in sorted(counts.items())))
    if report.kept_fp32:
        lines.append("operators kept FP32: " + ", ".join(f"{n} x {op}" for op, n in sorted(report.kept_fp32.items())))
    return lines + report.notes


def markdown(report: Report) -> str:
    rows = [f"# ohq_tvm report: {report.model}", "",
            f"Target `{report.target}`, {report.threads} threads. Objective: {report.objective}.", "",
            *[f"- {line}" for line in summary_lines(report)], "",
            f"| layer | kind | chosen | ms | loss ({report.sensitivity}) | W8A8 ms | FP32 ms |",
            "|---|---|---|---|---|---|---|"]
    get = lambda c, name: c.candidates.get(name, {}).get("ms")   # noqa: E731
    for c in report.layers:
        w8, fp = get(c, "W8A8"), get(c, "FP32")
        rows.append(f"| {c.id} | {c.kind} | {c.config} | {c.ms:.4f} | {c.loss:.3g} | "
                    f"{'-' if w8 is None else f'{w8:.4f}'} | {'-' if fp is None else f'{fp:.4f}'} |")
    rows += ["", "Stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report.stage_seconds.items()), ""]
    return "\n".join(rows)


def write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def plot_bits(report: Report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .kernels import parse_config
    ids = [c.id for c in report.layers]
    configs = [parse_config(c.config) for c in report.layers]
    wb, ab = [c.wbits for c in configs], [c.abits for c in configs]
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(ids)), 3.2))
    x = range(len(ids))
    ax.bar([i - 0.2 for i in x], [min(b, 16) for b in wb], 0.4, label="weight bits")
    ax.bar([i + 0.2 for i in x], [min(b, 16) for b in ab], 0.4, label="activation bits")
    ax.set_xticks(list(x), ids, rotation=90, fontsize=7)
    ax.set_yticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "FP32"])
    ax.set_ylabel("bits")
    ax.set_title(f"{report.model}: bit-widths per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_pareto(report: Report, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if report.pareto:
        ax.plot([p["ms"] for p in report.pareto], [p["loss"] for p in report.pareto], "o-", label="Pareto front")
    if report.predicted_ms is not None:
        ax.plot([report.predicted_ms], [report.estimated_loss], "r*", ms=12, label="chosen")
    for value, name in ((report.uniform_int8_ms, "uniform INT8"), (report.budget_ms, "budget")):
        if value:
            ax.axvline(value, ls="--", lw=1, color="gray" if name == "budget" else "green", label=name)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel(f"estimated loss ({report.sensitivity})")
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_title(f"{report.model}: latency vs estimated loss")
    if ax.get_legend_handles_labels()[0]:     # e.g. --uniform: nothing was solved
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write(report: Report, output: Path) -> list[Path]:
    """`<output>.report.json`, `.report.md`, `.bits.png`, `.pareto.png` beside the output; atomically."""
    output = Path(output)
    stem = output.with_suffix("")
    paths = [Path(f"{stem}.report.json"), Path(f"{stem}.report.md"), Path(f"{stem}.bits.png"),
             Path(f"{stem}.pareto.png")]
    write_text(paths[0], json.dumps(report.to_json(), indent=1) + "\n")
    write_text(paths[1], markdown(report))
    plot_bits(report, paths[2])
    plot_pareto(report, paths[3])
    return paths


def layer_choice(layer: Layer, config: str, options: dict[str, dict]) -> LayerChoice:
    return LayerChoice(layer.id, layer.kind, config, options[config]["ms"], options[config]["loss"], options)
