"""Bad input, damaged logs, kills and fuzzed models: every case ends in a result or one clean error line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FMNIST, TUNING_LOGS, copy_logs, run_cli
from ohq_tvm import tune
from ohq_tvm.build import atomic_write
from ohq_tvm.compile import kept_fp32
from ohq_tvm.errors import OhqError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.target import parse_target

TARGET = parse_target("llvm")


def one_clean_line(result: subprocess.CompletedProcess) -> bool:
    """The run ended in one `error: ...` line (progress lines may precede it), no traceback."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return errors == lines[-1:] and "Traceback" not in result.stderr


def test_truncated_and_invalid_models(tmp_path):
    data = FMNIST.read_bytes()
    for cut in (len(data) // 2, 37):
        path = tmp_path / f"cut{cut}.onnx"
        path.write_bytes(data[:cut])
        with pytest.raises(OhqError, match="not a readable ONNX model|invalid ONNX model"):
            load_onnx(path)
    model = onnx.load(str(FMNIST))
    model.graph.node[1].input[0] = "nowhere"
    onnx.save(model, str(tmp_path / "dangling.onnx"))
    with pytest.raises(OhqError, match="invalid ONNX model"):
        load_onnx(tmp_path / "dangling.onnx")


def test_operators_the_importer_cannot_read_are_named(tmp_path):
    model = onnx.load(str(FMNIST))
    model.graph.node[1].op_type = "FancyOp"
    model.graph.node[1].domain = "com.example"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    onnx.save(model, str(tmp_path / "custom.onnx"))
    result = run_cli("compile", tmp_path / "custom.onnx", "--output", tmp_path / "o.so")
    assert result.returncode == 2 and one_clean_line(result) and "FancyOp" in result.stderr, result.stderr


def test_operators_kept_fp32_are_counted():
    ops = ("Conv", "BatchNormalization", "Relu", "Conv", "MatMul", "Add", "Relu")
    assert kept_fp32(ops, quantized=2) == {"Relu": 2, "Add": 1, "Conv/MatMul without constant weights": 1}
    assert kept_fp32(("Conv", "Gemm"), quantized=2) == {}
    absorbed = [{"epilogue": ["add", "relu"]}, {"epilogue": ["add"]}]      # one ReLU in a kernel's epilogue
    assert kept_fp32(ops, quantized=2, records=absorbed) == {"Relu": 1, "Add": 1,
                                                            "Conv/MatMul without constant weights": 1}


def test_missing_cross_compiler_is_one_line_exit_2(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}    # python, but no aarch64 gcc
    result = subprocess.run([sys.executable, "-m", "ohq_tvm.compile", str(FMNIST), "--target", "aarch64",
                             "--uniform", "W8A8", "--output", str(tmp_path / "a.so")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2 and one_clean_line(result) and "cross compiler" in result.stderr, result.stderr
    assert not (tmp_path / "a.so").exists()


@pytest.mark.parametrize("damage", ["garbage line", "truncated line", "unreadable"])
def test_damaged_metaschedule_database_is_a_clean_error(tmp_path, damage):
    if not (tune.database_dir(TUNING_LOGS, TARGET) / "database_tuning_record.json").is_file():
        pytest.skip(f"no committed tuning logs for this CPU ({TARGET.key})")
    shutil.copytree(tune.database_dir(TUNING_LOGS, TARGET), tune.database_dir(tmp_path, TARGET),
                    ignore=shutil.ignore_patterns("logs"))
    records = tune.database_dir(tmp_path, TARGET) / "database_tuning_record.json"
    original = records.read_bytes()
    if damage == "garbage line":
        records.write_bytes(original + b"{not json\n")
    elif damage == "truncated line":
        records.write_bytes(original[: len(original) // 2])
    else:
        records.chmod(0)
        if os.access(records, os.R_OK):
            pytest.skip("running as root: chmod cannot make the file unreadable")
    result = run_cli("compile", FMNIST, "--uniform", "FP32", "--tune-trials", "0",
                     "--work-dir", tmp_path, "--output", tmp_path / "m.so")
    assert result.returncode == 2 and one_clean_line(result) and "tuning database" in result.stderr, result.stderr
    records.chmod(0o644)
    if damage != "unreadable":
        assert records.read_bytes() != original and len(records.read_bytes()) > 0    # left as it was found


def test_budget_below_the_feasible_minimum_names_it(tmp_path):
    work_dir = tmp_path / "logs"
    copy_logs(work_dir, TARGET)
    result = run_cli("compile", FMNIST, "--latency-budget", "0.0001ms", "--no-baselines", "--bits", "8",
                     "--tune-trials", "0", "--work-dir", work_dir, "--output", tmp_path / "m.so", timeout=1200)
    assert result.returncode == 2 and one_clean_line(result), result.stderr
    assert "smallest feasible" in result.stderr
    assert not (tmp_path / "m.so").exists()


def test_a_killed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "model.so"
    target.write_bytes(b"the user's module")
    script = ("import sys, time; from ohq_tvm.build import atomic_write\n"
              "def slow(tmp):\n"
              "    open(tmp, 'wb').write(b'half a module'); print('writing', flush=True); time.sleep(60)\n"
              f"atomic_write({str(target)!r}, slow)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert target.read_bytes() == b"the user's module"
    before = sorted(p.name for p in tmp_path.iterdir())    # model.so and the killed writer's hidden temp file

    def failing(tmp):
        open(tmp, "wb").write(b"partial")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"the user's module"
    assert sorted(p.name for p in tmp_path.iterdir()) == before     # a failed write cleans up after itself


def _report_without_timings(path):
    report = json.loads(path.read_text())
    report.pop("stage_seconds")
    return report


def test_seed_makes_the_flow_deterministic(tmp_path):
    """Same seed and logs -> same configuration and the same report (timings apart); another seed -> other MQE inputs."""
    outputs = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        work_dir = tmp_path / f"logs_{run}"          # separate copies: the second run may not read the first's cache
        copy_logs(work_dir, TARGET)
        if run != "a":      # a CPU without committed OQA timings: the same logs are the ones run a measured
            shutil.copytree(tmp_path / "logs_a" / TARGET.key, work_dir / TARGET.key, dirs_exist_ok=True)
        out = tmp_path / f"{run}.so"
        result = run_cli("compile", FMNIST, "--seed", seed, "--no-baselines", "--tune-trials", "0",
                         "--work-dir", work_dir, "--output", out, timeout=1800)    # default: with the loss check
        assert result.returncode == 0, result.stderr
        outputs[run] = out
    a, b, c = (outputs[r] for r in "abc")
    assert a.with_suffix(".quant.json").read_bytes() == b.with_suffix(".quant.json").read_bytes()
    assert _report_without_timings(a.with_suffix(".report.json")) == _report_without_timings(b.with_suffix(".report.json"))
    losses = lambda p: [layer["loss"] for layer in json.loads(p.with_suffix(".report.json").read_text())["layers"]]  # noqa: E731
    assert losses(a) != losses(c)


# --- fuzz: random mutations of a valid model through the whole CLI ---------------------------------------------

def _mutate(model: onnx.ModelProto, draw) -> onnx.ModelProto | bytes:
    kind = draw(st.sampled_from(["op_type", "drop_node", "attribute", "input_dim", "input_type",
                                 "initializer", "rewire", "bytes"]))
    nodes = model.graph.node
    i = draw(st.integers(0, len(nodes) - 1))
    if kind == "op_type":
        nodes[i].op_type = draw(st.sampled_from(["Relu", "Sigmoid", "Conv", "Add", "MatMul", "Flatten", "NoSuchOp"]))
    elif kind == "drop_node":
        del nodes[i]
    elif kind == "attribute":
        attrs = [a for n in nodes for a in n.attribute if a.ints or a.type == onnx.AttributeProto.INT]
        if attrs:
            attr = attrs[draw(st.integers(0, len(attrs) - 1))]
            if attr.ints:
                attr.ints[draw(st.integers(0, len(attr.ints) - 1))] = draw(st.integers(-2, 9))
            else:
                attr.i = draw(st.integers(-2, 9))
    elif kind == "input_dim":
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.integers(0, 64))
    elif kind == "input_type":
        model.graph.input[0].type.tensor_type.elem_type = draw(st.sampled_from([1, 2, 6, 7, 10, 11]))
    elif kind == "initializer":
        tensor = model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]
        if draw(st.booleans()) and tensor.dims:
            tensor.dims[0] = draw(st.integers(1, 50))
        else:
            raw = np.frombuffer(onnx.numpy_helper.to_array(tensor).tobytes(), np.uint8).copy()
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))     # e.g. NaN or huge weights
            tensor.raw_data = raw.tobytes()
            del tensor.float_data[:]
    elif kind == "rewire":
        names = [o for n in nodes for o in n.output] + [t.name for t in model.graph.initializer]
        if nodes[i].input:
            nodes[i].input[draw(st.integers(0, len(nodes[i].input) - 1))] = draw(st.sampled_from(names))
    else:
        data = bytearray(model.SerializeToString())
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return model


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_models_end_in_a_result_or_a_clean_error(tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("fuzz")
    mutated = _mutate(onnx.load(str(FMNIST)), data.draw)
    path = tmp / "mutated.onnx"
    path.write_bytes(mutated if isinstance(mutated, bytes) else mutated.SerializeToString())
    start = time.monotonic()
    result = run_cli("compile", path, "--uniform", "W8A8", "--no-baselines", "--tune-trials", "0",
                     "--work-dir", tmp / "logs", "--output", tmp / "m.so", timeout=300)
    assert result.returncode in (0, 2), result.stderr[-3000:]
    if result.returncode == 0:
        assert (tmp / "m.so").is_file() and (tmp / "m.quant.json").is_file()
    else:
        assert one_clean_line(result), result.stderr[-3000:]
        assert not (tmp / "m.so").exists()
    assert time.monotonic() - start < 300
