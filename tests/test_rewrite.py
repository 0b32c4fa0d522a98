"""The QuantizeLayers pass: planned layers become their integer kernels, epilogues absorbed, the rest untouched."""
import numpy as np
import pytest
import tvm
import tvm_ffi
from tvm import relax

from ohq_tvm import kernels
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import find_layers
from ohq_tvm.rewrite import KERNEL_PREFIX, LayerPlan, QuantizeLayers, hollow
from ohq_tvm.target import parse_target
from conftest import FMNIST, layer_module

TARGET = parse_target("llvm")
ISA = kernels.isa_of(TARGET.tvm)


def conv_block(kind: str, rng, clamp: str):
    """clamp(conv2d/matmul(x, W) + b) * 0.5: the multiply is an FP32 op that must stay FP32."""
    mod, w, b = layer_module(kind, rng, channels=24, size=11, clamp=clamp, tail=True)
    return mod, w, b, (0.0, np.inf) if clamp == "relu" else (0.0, 6.0)


def run(mod, x):
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET.tvm), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("kind,name", [("conv", "W8A8"), ("conv", "W4A8"), ("conv", "W2A2"), ("conv", "W1A1"),
                                       ("depthwise", "W8A8"), ("dense", "W4A8"), ("dense", "W1A2")])
def test_rewritten_layer_is_its_kernel(kind, name):
    rng = np.random.default_rng(3)
    mod, w, b, clamp = conv_block(kind, rng, "relu" if name != "W4A8" else "relu6")
    [layer] = find_layers(mod)
    config = kernels.parse_config(name)
    knobs = kernels.knob_space(layer, config, ISA)[-1]
    act_range = (-1.0, 3.0)
    rewrite = QuantizeLayers({layer.id: LayerPlan(config, knobs, act_range)}, TARGET.tvm)
    quantized = rewrite(mod)
    ops = [b.value.op.name for blk in quantized["main"].body.blocks for b in blk.bindings
           if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)]
    assert ops == ["relax.call_tir", "relax.multiply"]      # conv, bias and clamp are one kernel call
    [record] = rewrite.records
    assert record["config"] == name and record["epilogue"][0] == "add" and record["clamp"] == list(clamp)

    x = rng.uniform(-1.5, 3.5, layer.input_shape).astype(np.float32)
    packed = kernels.pack(layer, config, knobs, ISA, w, b, kernels.ActQuant.from_range(*act_range, config.abits),
                          clamp)
    expected = 0.5 * kernels.simulate(layer, packed, x)
    np.testing.assert_allclose(run(quantized, x), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(run(mod, x) - expected).max() > 1e-3     # and it is really quantized


def test_unplanned_layers_stay_and_the_input_module_is_untouched():
    imported = load_onnx(FMNIST)
    layers = find_layers(imported.mod)
    before = imported.mod["main"]
    config = kernels.parse_config("W8A8")
    plan = {l.id: LayerPlan(config, kernels.knob_space(l, config, ISA)[0], (0.0, 4.0)) for l in layers[1:3]}
    rewrite = QuantizeLayers(plan)
    with TARGET.tvm:
        quantized = rewrite(imported.mod)
    assert imported.mod["main"].same_as(before)
    assert [l.weight_shape for l in find_layers(quantized)] == [l.weight_shape for l in layers if l.id not in plan] and \
        [r["layer"] for r in rewrite.records] == sorted(plan)
    with pytest.raises(Exception, match="conv2d99"):
        QuantizeLayers({"conv2d99": plan[layers[1].id]}, TARGET.tvm)(imported.mod)


def test_quantized_neighbours_pass_codes():
    """Where a quantized layer feeds only another, the activation crosses as uint8 codes, and the model
    computes what it computes with float activations between the kernels (up to near-tie roundings)."""
    imported = load_onnx(FMNIST)
    layers = find_layers(imported.mod)
    config = kernels.parse_config("W8A8")
    plan = {l.id: LayerPlan(config, kernels.knob_space(l, config, ISA)[0], (-1.0, 4.0)) for l in layers}
    linked, floats = QuantizeLayers(plan, TARGET.tvm), QuantizeLayers(plan, TARGET.tvm, codes=False)
    x = np.random.default_rng(0).uniform(0, 1, (1, 1, 28, 28)).astype(np.float32)
    got, want = run(linked(imported.mod), x), run(floats(imported.mod), x)
    handed = [r["layer"] for r in linked.records if r["output"] != "float"]
    assert handed == sorted(l.id for l in layers if l.codes_out) and len(handed) >= 2
    assert sum(r["input"] == "codes" for r in linked.records) == len(handed)
    assert all(r["input"] == r["output"] == "float" for r in floats.records)
    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())


def test_hollow_empties_the_integer_kernels_and_nothing_else():
    """The module the rest of the network is timed on (the latency model's constant)."""
    rng = np.random.default_rng(3)
    mod, w, b, clamp = conv_block("conv", rng, "relu")
    [layer] = find_layers(mod)
    config = kernels.parse_config("W8A8")
    plan = {layer.id: LayerPlan(config, kernels.knob_space(layer, config, ISA)[0], (-1.0, 3.0))}
    quantized = QuantizeLayers(plan, TARGET.tvm)(mod)
    emptied = hollow(quantized)
    changed = [gv.name_hint for gv, func in quantized.functions.items()
               if not tvm_ffi.structural_equal(func, emptied[gv.name_hint])]
    assert len(changed) == 1 and changed[0].startswith(KERNEL_PREFIX)
    assert isinstance(emptied[changed[0]].body, tvm.tirx.Evaluate)
    x = rng.uniform(-1.5, 3.5, layer.input_shape).astype(np.float32)
    assert run(emptied, x).shape == run(quantized, x).shape
