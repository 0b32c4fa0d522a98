"""MQE: the masked simulation matches the integer kernels and the FP32 model; estimators, distillation, CLI."""
import json

import numpy as np
import pytest
import tvm

from conftest import FMNIST, copy_logs, layer_module, run_cli
from ohq_tvm import kernels, mqe
from ohq_tvm.errors import OhqError
from ohq_tvm.frontend import Imported, load_onnx, run_onnxruntime
from ohq_tvm.layers import find_layers
from ohq_tvm.measure import build_kernel, candidates_for_bits
from ohq_tvm.target import parse_target

TARGET = parse_target("llvm")
ISA = kernels.isa_of(TARGET.tvm)
CONFIGS = candidates_for_bits([8, 4, 2, 1])


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A copy of the committed MetaSchedule records: the tests tune nothing."""
    return copy_logs(tmp_path_factory.mktemp("logs"), TARGET, oqa=False)


@pytest.fixture(scope="module")
def fmnist(work_dir):
    imported = load_onnx(FMNIST)
    layers = find_layers(imported.mod)
    return imported, layers, mqe.Simulation(imported, layers, TARGET, work_dir, tune_trials=0)


def one_layer(kind: str, rng) -> tuple[Imported, np.ndarray, np.ndarray]:
    """main(x) = conv2d/matmul(x, W) + b as a module, its weight and bias."""
    mod, w, b = layer_module(kind, rng)
    shape = tuple(int(d) for d in mod["main"].params[0].ty.shape)
    return Imported(mod, "x", shape, "float32", ()), w, b


@pytest.mark.parametrize("kind", ["conv", "depthwise", "dense"])
def test_simulation_agrees_with_the_integer_kernels(kind, tmp_path):
    """For every candidate: simulated and compiled layer outputs within one output quantization step."""
    rng = np.random.default_rng(1)
    imported, w, b = one_layer(kind, rng)
    [layer] = find_layers(imported.mod)
    sim = mqe.Simulation(imported, [layer], TARGET, tmp_path, tune_trials=0)
    x = rng.uniform(-1.5, 4, imported.input_shape).astype(np.float32)
    lo, hi = -1.0, 3.0            # inputs outside the range exercise the clipping
    configs = mqe.available(layer, CONFIGS)
    assert [c.name for c in configs] == (["W8A8", "W4A8", "W2A8"] if kind == "depthwise" else
                                         [c.name for c in CONFIGS[1:]])
    assert layer.id in sim.fp32_biases        # the bias is a parameter: the simulation corrects it as the kernel
    mean = x.reshape(-1, x.shape[-1]).mean(0)
    calibration = mqe.Calibration({layer.id: (lo, hi)}, "data", {layer.id: tuple(mean)})
    for config in configs:
        knobs = kernels.knob_space(layer, config, ISA)[0]
        packed = kernels.pack(layer, config, knobs, ISA, w, b, kernels.ActQuant.from_range(lo, hi, config.abits),
                              input_mean=mean)
        lib = build_kernel(layer, config, knobs, TARGET.tvm)
        out = tvm.runtime.tensor(np.zeros(layer.output_shape, np.float32))
        lib["main"](*(tvm.runtime.tensor(a) for a in (x, packed.w, packed.chan, packed.q)), out)
        mask = mqe.quantization_mask(sim, [layer], {layer.id: config}, calibration, ISA.reduce_range)
        simulated = sim.logits(x, *mask).reshape(layer.output_shape)
        step = packed.chan[0]                     # output LSB per channel: activation x weight scale
        assert np.all(np.abs(simulated - out.numpy()) <= step + 1e-4 * np.abs(simulated)), config.name
        unquantized = sim.logits(x, sim.idle_mask(), {}).reshape(layer.output_shape)
        assert np.abs(unquantized - simulated).max() > step.max(), config.name   # the mask did something


def test_idle_mask_is_the_fp32_model(fmnist):
    imported, layers, sim = fmnist
    x = np.random.default_rng(0).uniform(0, 1, (3, *imported.input_shape[1:])).astype(np.float32)
    logits, inputs = sim.run(x)
    expected = np.concatenate([run_onnxruntime(FMNIST, s[None]) for s in x])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    assert len(inputs) == 3 and [t.shape for t in inputs[0]] == [tuple(l.input_shape) for l in layers]
    np.testing.assert_allclose(inputs[1][0].numpy().transpose(0, 3, 1, 2), x[1:2])   # NHWC view of the input


def test_a_run_from_a_later_segment_is_the_whole_run(fmnist):
    """Quantizing only a late layer starts from that layer's segment, from FP32 inputs kept of the same x."""
    imported, layers, sim = fmnist
    assert len(sim.segments) > 3 and sim.segment_of == sorted(sim.segment_of)
    rng = np.random.default_rng(2)
    x, other = (rng.uniform(0, 1, (2, *imported.input_shape[1:])).astype(np.float32) for _ in range(2))
    sim.run(x)
    config = kernels.parse_config("W2A2")
    calibration = mqe.Calibration({layer.id: (0.0, 4.0) for layer in layers}, "data")
    for index in (len(layers) - 1, len(layers) // 2):
        assert sim.segment_of[index] > 0
        mask = mqe.quantization_mask(sim, layers, {layers[index].id: config}, calibration, ISA.reduce_range)
        for data in (x, other, x):     # the kept FP32 inputs follow x
            np.testing.assert_array_equal(sim.logits(data, *mask), sim.run(data, *mask)[0])
    assert not np.array_equal(sim.logits(x, *mask), sim.run(x)[0])


def test_estimators_score_every_available_candidate(fmnist):
    imported, layers, sim = fmnist
    x = mqe.noise_inputs(imported.input_shape, 4, seed=0, input_range=(0.0, 1.0))
    results = {m: mqe.estimate(FMNIST, imported, layers, CONFIGS, TARGET, method=m, calibration_data=x,
                               simulation=sim) for m in ("mqe", "weight-error", "output-mse")}
    for result in results.values():
        assert result.calibration.source == "data" and set(result.scores) == {l.id for l in layers}
        for layer in layers:
            row = result.scores[layer.id]
            assert row["FP32"] == 0 and set(row) == {"FP32"} | {c.name for c in mqe.available(layer, CONFIGS)}
            assert all(v >= 0 for v in row.values())
            assert row["W8A8"] < row["W2A2" if layer.groups == 1 else "W2A8"]
    depthwise = next(l for l in layers if l.kind == "depthwise")
    assert set(results["mqe"].scores[depthwise.id]) == {"FP32", "W8A8", "W4A8", "W2A8"}
    again = mqe.estimate(FMNIST, imported, layers, CONFIGS, TARGET, calibration_data=x, simulation=sim)
    assert again.scores == results["mqe"].scores and again.calibration == results["mqe"].calibration
    lo, hi = results["mqe"].calibration.ranges[layers[1].id]
    assert lo == 0.0 < hi                      # conv2d1 reads a ReLU output


def test_mix_loss_of_one_layer_is_its_score_and_of_many_not_their_sum(fmnist):
    imported, layers, sim = fmnist
    x = mqe.noise_inputs(imported.input_shape, 4, seed=0, input_range=(0.0, 1.0))
    configs = [kernels.parse_config(n) for n in ("FP32", "W8A8", "W2A2")]
    result = mqe.estimate(FMNIST, imported, layers, configs, TARGET, calibration_data=x, simulation=sim)
    np.testing.assert_array_equal(result.inputs, x)
    mix = mqe.MixLoss(sim, layers, result.calibration, result.inputs, ISA.reduce_range)
    fp32 = {l.id: "FP32" for l in layers}
    assert mix(fp32) == pytest.approx(0, abs=1e-9)
    first = layers[0].id
    assert mix({**fp32, first: "W2A2"}) == pytest.approx(result.scores[first]["W2A2"], rel=1e-6)
    low = {l.id: "W2A2" if l.groups == 1 else "W8A8" for l in layers}
    summed = sum(result.scores[lid][name] for lid, name in low.items())
    assert abs(mix(low) - summed) > 0.1 * summed    # a whole-model figure: the parts do not add up to it
    int8 = {l.id: "W8A8" for l in layers}
    assert 0 < mix(int8) < mix(low)


def test_accuracy_method_on_labelled_data(fmnist):
    from ohq_tvm.data import fashion_mnist_test
    imported, layers, sim = fmnist
    x, y = fashion_mnist_test(32)
    configs = [kernels.parse_config(name) for name in ("FP32", "W8A8", "W1A1")]
    result = mqe.estimate(FMNIST, imported, layers, configs, TARGET, method="accuracy", calibration_data=x,
                          labels=y, simulation=sim)
    drops = result.scores["conv2d0"]
    assert set(drops) == {"FP32", "W8A8", "W1A1"}
    assert abs(drops["W8A8"]) <= 1 / 32 and drops["W1A1"] > 0.25
    with pytest.raises(OhqError, match="labelled"):
        mqe.estimate(FMNIST, imported, layers, CONFIGS, TARGET, method="accuracy", simulation=sim)


def test_distillation_matches_bn_statistics():
    import onnx
    model = onnx.load(str(FMNIST))
    stats = mqe.bn_statistics(model)
    assert len(stats) == 9
    step = mqe._distill_step(model, stats, (4, 1, 28, 28))
    noise = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    distilled = mqe.distill(FMNIST, (1, 1, 28, 28), samples=4, steps=40)
    assert step(distilled)[0] < 0.5 * step(noise)[0]
    eps, i = 1e-2, (0, 0, 9, 11)               # the gradient is the loss's derivative
    plus, minus = noise.copy(), noise.copy()
    plus[i] += eps
    minus[i] -= eps
    numeric = (step(plus)[0] - step(minus)[0]) / (2 * eps)
    assert numeric == pytest.approx(step(noise)[1][i], rel=0.2, abs=1e-3)


def test_distillation_reads_exported_graphs(tmp_path):
    """As torch exports them: Clip bounds as initializer inputs (imported as call_tir, which has no gradient)
    and a head Reshape traced at batch 1 (wrong at the distillation batch; not needed for BN statistics)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)), "gamma": rng.uniform(0.5, 2, 4), "beta": rng.standard_normal(4),
             "mean": rng.standard_normal(4), "var": rng.uniform(0.5, 2, 4), "lo": np.array(0.0), "hi": np.array(6.0),
             "flat": np.array([1, -1]), "fc": rng.standard_normal((4 * 8 * 8, 5))}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["b"]),
         helper.make_node("Clip", ["b", "lo", "hi"], ["r"]),
         helper.make_node("Reshape", ["r", "flat"], ["f"]),
         helper.make_node("MatMul", ["f", "fc"], ["y"])],
        "exported", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(v.astype(np.int64 if k == "flat" else np.float32), k) for k, v in inits.items()])
    path = tmp_path / "exported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = onnx.load(str(path))
    step = mqe._distill_step(model, mqe.bn_statistics(model), (4, 3, 8, 8))
    noise = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    assert step(mqe.distill(path, (1, 3, 8, 8), samples=4, steps=40))[0] < 0.5 * step(noise)[0]
    # a known input range: the inputs start as noise in it and never leave it
    start = mqe.noise_inputs((1, 3, 8, 8), 4, 0, (0.0, 1.0))
    boxed = mqe.distill(path, (1, 3, 8, 8), samples=4, steps=40, input_range=(0.0, 1.0))
    assert boxed.min() >= 0.0 and boxed.max() <= 1.0
    assert step(boxed)[0] < 0.5 * step(start)[0]


def test_calibration_data_errors(tmp_path):
    with pytest.raises(OhqError, match="does not fit"):
        mqe.load_calibration_data(np.zeros((2, 3, 28, 28)), (1, 1, 28, 28))
    with pytest.raises(OhqError, match="expected a folder"):
        mqe.load_calibration_data(tmp_path / "x.txt", (1, 1, 28, 28))
    np.save(tmp_path / "x.npy", np.ones((5, 28, 28), np.float32))
    assert mqe.load_calibration_data(tmp_path / "x.npy", (1, 1, 28, 28)).shape == (5, 1, 28, 28)


def test_cli_prints_and_writes_scores(work_dir, tmp_path):
    out = tmp_path / "s.json"
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).uniform(0, 1, (4, 1, 28, 28)).astype(np.float32))
    result = run_cli("mqe", FMNIST, "--sensitivity", "weight-error", "--bits", "8,2", "--calibration-data",
                     tmp_path / "calib.npz", "--work-dir", work_dir, "--tune-trials", "0", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "conv2d4" in result.stdout and "W2A2" in result.stdout
    report = json.loads(out.read_text())
    assert report["method"] == "weight-error" and report["source"] == "data"
    assert set(report["scores"]["conv2d0"]) == {"FP32", "W8A8", "W2A8", "W2A2"}
    bad = run_cli("mqe", FMNIST, "--sensitivity", "hessian")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_cache_key_follows_inputs_and_estimator_revision(monkeypatch):
    configs = candidates_for_bits([8, 2])
    key = lambda **kw: mqe.cache_key(FMNIST, kw.get("configs", configs), "mqe", 8, kw.get("seed", 0),  # noqa: E731
                                     kw.get("data"), False, kw.get("input_range"))
    assert key() == key() and key(seed=1) != key() and key(configs=configs[:2]) != key()
    assert key(input_range=(0.0, 1.0)) not in (key(), key(input_range=(-1.0, 1.0)))
    # real calibration data: the range bounds only synthetic inputs
    assert key(data=FMNIST, input_range=(0.0, 1.0)) == key(data=FMNIST)
    before = key()
    monkeypatch.setattr(mqe, "REVISION", mqe.REVISION + 1)
    assert key() != before
