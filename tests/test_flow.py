"""The whole OHQ flow through the CLI on the Fashion-MNIST model: measure -> mqe -> solve -> rewrite -> build."""
import json
import subprocess

import pytest

from conftest import FMNIST, copy_logs, run_cli
from ohq_tvm.data import fashion_mnist_test
from ohq_tvm.runtime import Model
from ohq_tvm.target import parse_target

TARGET = parse_target("llvm")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A copy of the committed logs (MetaSchedule records and OQA timings): the flow runs warm."""
    return copy_logs(tmp_path_factory.mktemp("logs"), TARGET)


@pytest.fixture(scope="module")
def flow(work_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("flow") / "fmnist.so"
    # budget 1.0: uniform INT8 itself fits (the budget is a fraction of its predicted latency), so the
    # budgeted path runs whatever this noisy machine measures for a 50-us model
    result = run_cli("compile", FMNIST, "--output", out, "--work-dir", work_dir, "--bits", "8,4,2,1",
                     "--latency-budget", "1.0", "--tune-trials", "0", timeout=1800)
    assert result.returncode == 0, result.stderr
    return out, result


def test_writes_module_sidecar_reports_and_plots(flow):
    out, result = flow
    for suffix in (".so", ".quant.json", ".report.json", ".report.md", ".bits.png", ".pareto.png"):
        assert out.with_suffix(suffix).stat().st_size > 0, suffix
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert {"config", "predicted_ms", "measured_ms", "uniform_int8_ms", "fp32_ms", "stage_seconds", "layers"} <= set(report)
    assert {"measure", "mqe", "solve", "build"} <= set(report["stage_seconds"])
    assert len(report["config"]) == 10 and "matmul0" in report["config"]
    assert report["objective"] == f"least estimated loss within {report['budget_ms']:.3f} ms" and report["budget_ms"] > 0
    if report["notes"]:       # the solver's choice measured slower than uniform INT8: INT8 was shipped
        assert "uniform INT8 is shipped" in report["notes"][0] and set(report["config"].values()) == {"W8A8"}
    else:
        assert report["predicted_ms"] <= report["budget_ms"] * (1 + 1e-9)
    for layer in report["layers"]:        # the solver took a measured, estimated candidate for every layer
        assert layer["config"] in layer["candidates"] and layer["ms"] == layer["candidates"][layer["config"]]["ms"]
    assert "conv2d0" in result.stdout and "predicted" in result.stdout
    # OQA's latency check: the measured rest plus the layers' W8A8 timings, against uniform INT8 measured
    assert 0 < report["fixed_ms"] < report["int8_predicted_ms"] and "latency check" in result.stdout
    assert report["kept_fp32"].get("Add", 0) >= 1 and "BatchNormalization" not in report["kept_fp32"]
    assert "operators kept FP32" in out.with_suffix(".report.md").read_text()
    sidecar = json.loads(out.with_suffix(".quant.json").read_text())
    assert sidecar["config"] == report["config"]
    assert {r["layer"] for r in sidecar["layers"]} == {k for k, v in report["config"].items() if v != "FP32"}


def test_mixed_module_accuracy_within_one_point_of_fp32(flow):
    out, _ = flow
    x, y = fashion_mnist_test()
    fp32 = 0.9175                          # the FP32 model's top-1 (onnxruntime and our FP32 module)
    top1 = float((Model.load(out).run_batch(x).argmax(-1) == y).mean())
    assert top1 >= fp32 - 0.01, top1


def test_sidecar_config_rebuilds_and_cross_compiles(flow, work_dir, tmp_path):
    out, _ = flow
    arm = tmp_path / "fmnist_arm.so"
    result = run_cli("compile", FMNIST, "--target", "aarch64", "--config", out.with_suffix(".quant.json"),
                     "--output", arm, "--work-dir", work_dir, "--no-baselines", "--tune-trials", "0")
    assert result.returncode == 0, result.stderr
    assert "aarch64" in subprocess.run(["file", "-L", str(arm)], capture_output=True, text=True).stdout
    assert json.loads(arm.with_suffix(".quant.json").read_text())["config"] == \
        json.loads(out.with_suffix(".quant.json").read_text())["config"]


@pytest.mark.parametrize("args,message", [
    (["--latency-budget", "-1"], "must be positive"),
    (["--latency-budget", "0"], "must be positive"),
    (["--latency-budget", "fast"], "not a number"),
    (["--uniform", "W3A3"], "unknown candidate"),
    (["--exclude", "conv2d77"], "no layer"),
    (["--bits", "8,3"], "supported bit-widths"),
    (["--input-range", "1,0"], "LO must be below HI"),
    (["--input-range", "0,one"], "expected LO,HI"),
    (["--input-range", "-1,1"], "--input-range=-1,1"),
])
def test_bad_options_are_one_line_exit_2(args, message, tmp_path):
    result = run_cli("compile", FMNIST, "--output", tmp_path / "m.so", *args)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "m.so").exists()
