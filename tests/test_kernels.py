"""Every template x bit config, bit-exact against the numpy integer reference on random shapes."""
import re

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ohq_tvm import kernels
from ohq_tvm.kernels import ActQuant, Geometry, conv_reference
from ohq_tvm.layers import Layer
from ohq_tvm.target import parse_target

TARGET = parse_target("llvm").tvm
ISA = kernels.isa_of(TARGET)
INT_CONFIGS = [c for c in kernels.CANDIDATES.values() if c.family != "fp32"]
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def conv_layer(c, o, h, w, k, stride, pad, groups=1) -> Layer:
    oh = (h + pad[0] + pad[2] - k) // stride + 1
    ow = (w + pad[1] + pad[3] - k) // stride + 1
    kind = "conv" if groups == 1 else "depthwise" if groups == c == o else "grouped"
    return Layer("conv2d0", "conv2d", kind, (1, h, w, c), (o, k, k, c // groups), (1, oh, ow, o),
                 (stride, stride), pad, (1, 1), groups)


def dense_layer(m, k, n) -> Layer:
    return Layer("matmul0", "matmul", "dense", (m, k), (k, n), (m, n))


convs = st.builds(conv_layer, c=st.integers(1, 70), o=st.integers(1, 40), h=st.integers(3, 11),
                  w=st.integers(3, 11), k=st.sampled_from([1, 3, 5]), stride=st.integers(1, 2),
                  pad=st.tuples(*[st.integers(0, 2)] * 4)).filter(lambda l: min(l.output_shape[1:3]) >= 1)
depthwise = st.integers(1, 48).flatmap(lambda c: st.builds(
    conv_layer, c=st.just(c), o=st.just(c), h=st.integers(3, 12), w=st.integers(3, 12),
    k=st.sampled_from([3, 5]), stride=st.integers(1, 2), pad=st.tuples(*[st.integers(0, 2)] * 4), groups=st.just(c)))
grouped_convs = st.tuples(st.integers(2, 4), st.integers(1, 8), st.integers(1, 8)).map(
    lambda t: conv_layer(t[0] * t[1], t[0] * t[2], 7, 7, 3, 1, (1, 1, 1, 1), t[0]))
denses = st.builds(dense_layer, m=st.one_of(st.just(1), st.integers(1, 16)), k=st.integers(1, 130),
                   n=st.integers(1, 40))


def random_codes(rng, config, shape):
    if config.wbits == 1:
        return rng.choice(np.array([-1, 1], np.int8), shape)
    qmax = kernels.scheme.weight_qmax(config.wbits, ISA.reduce_range and config.wbits == 8)
    return rng.integers(-qmax, qmax + 1, shape).astype(np.int8)


def compile_kernel(layer, config, knobs, io=kernels.Io(), target=TARGET):
    func = kernels.build(layer, config, knobs, target, io)
    return tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def run(lib, layer, args, dtype=np.float32):
    out = tvm.runtime.tensor(np.zeros(layer.output_shape, dtype))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    return out.numpy()


def exact_case(layer, config, knobs, isa, rng):
    """Kernel arguments whose float output is the exact integer sum (scale 1, offset -z*sum q,
    input = codes - z), and that sum from the numpy reference."""
    g = Geometry.of(layer)
    z = int(rng.integers(0, 2 ** config.abits))
    codes = random_codes(rng, config, (g.o, g.kh, g.kw, g.c // g.groups))
    qa = rng.integers(0, 2 ** config.abits, (g.n, g.h, g.w, g.c)).astype(np.uint8)
    chan = np.stack([np.ones(g.o, np.float32), -z * codes.reshape(g.o, -1).sum(1).astype(np.float32)])
    args = [(qa.astype(np.float32) - z).reshape(layer.input_shape), kernels.pack_codes(layer, config, knobs, isa, codes),
            chan, np.array([1, z, -np.inf, np.inf], np.float32)]
    want = conv_reference(qa, z, codes, g.strides, g.padding, g.groups)
    return args, want.astype(np.float32).reshape(layer.output_shape)


def check_exact(layer, config, seed, target=TARGET):
    """The first two knob settings, the first with float input, the second taking the input codes."""
    rng = np.random.default_rng(seed)
    isa = kernels.isa_of(target)
    space = kernels.knob_space(layer, config, isa)
    for knobs, io in zip((space[0], space[min(1, len(space) - 1)]), (kernels.Io(), kernels.Io(codes_in=True))):
        args, want = exact_case(layer, config, knobs, isa, rng)
        if io.codes_in:
            args[0] = (args[0] + args[3][1]).astype(np.uint8)     # input + zero point: the codes
        got = run(compile_kernel(layer, config, knobs, io, target), layer, args)
        np.testing.assert_array_equal(got, want, err_msg=f"{config.name} {knobs} {io}")


@pytest.mark.parametrize("config", [c for c in INT_CONFIGS], ids=lambda c: c.name)
@SETTINGS
@given(layer=st.one_of(convs, denses), seed=st.integers(0, 2 ** 16))
def test_dense_conv_and_matmul_bit_exact(config, layer, seed):
    check_exact(layer, config, seed)


AVX2 = parse_target('{"kind": "llvm", "mcpu": "znver3"}').tvm


@pytest.mark.skipif(kernels.isa_of(TARGET).name == "generic", reason="needs an AVX2 host")
@pytest.mark.parametrize("config", ["W4A8", "W2A8"])
@SETTINGS
@given(layer=st.one_of(convs, denses), seed=st.integers(0, 2 ** 16))
def test_avx2_int16_sums_of_lowbit_weights_bit_exact(config, layer, seed):
    """On AVX2 (compiled for it whatever the host's ISA) low-bit weights sum several vpmaddubsw results in int16."""
    check_exact(layer, kernels.parse_config(config), seed, AVX2)


def test_avx2_int16_sums_cover_whole_channel_quads():
    isa = kernels.isa_of(AVX2)
    quads = {c: kernels.conv.int16_quads(Geometry.of(conv_layer(c, 8, 5, 5, 3, 1, (1, 1, 1, 1))), isa, 4)
             for c in (3, 8, 24, 64)}
    assert quads == {3: 2, 8: 2, 24: 2, 64: 4}     # 2 codes per byte, up to 4 quads (255 * 15 * 2 * 4 < 2^15)
    assert kernels.conv.int16_quads(Geometry.of(conv_layer(64, 8, 5, 5, 3, 1, (1, 1, 1, 1))), isa, 8) == 1
    vnni = kernels.isa_of(parse_target('{"kind": "llvm", "mcpu": "znver4"}').tvm)
    assert kernels.conv.int16_quads(Geometry.of(dense_layer(1, 64, 8)), vnni, 4) == 1


@pytest.mark.parametrize("config", [c for c in INT_CONFIGS if c.abits == 8], ids=lambda c: c.name)
@SETTINGS
@given(layer=st.one_of(depthwise, grouped_convs), seed=st.integers(0, 2 ** 16))
def test_depthwise_and_grouped_bit_exact(config, layer, seed):
    check_exact(layer, config, seed)


@pytest.mark.parametrize("wbits, k, rows", [(4, 3, 3), (4, 5, 3), (2, 5, 5)])
def test_depthwise_int16_sums_at_their_bound(wbits, k, rows):
    """Every product at its largest (code 255 x weight code +-qmax): each chunk of kernel rows sums exactly in
    int16 (a 5x5 at 4 bits would not in one: 255 x 7 x 25 > 2^15, it takes rows 0-2, then 3-4)."""
    layer = conv_layer(40, 40, 8, 8, k, 1, (0, 0, 0, 0), 40)
    g, config = Geometry.of(layer), kernels.Config(wbits, 8)
    assert kernels.grouped.int16_rows(g, wbits) == rows
    qmax = kernels.scheme.weight_qmax(wbits)
    codes = np.where(np.arange(40) % 2, qmax, -qmax).astype(np.int8)[:, None, None, None] * np.ones((1, k, k, 1), np.int8)
    qa = np.full((1, 8, 8, 40), 255, np.uint8)
    want = conv_reference(qa, 0, codes, groups=40).astype(np.float32)
    assert np.abs(want).max() == 255 * qmax * k * k
    for knobs in kernels.knob_space(layer, config, ISA)[:2]:
        args = [qa, kernels.pack_codes(layer, config, knobs, ISA, codes),
                np.stack([np.ones(40, np.float32), np.zeros(40, np.float32)]),
                np.array([1, 0, -np.inf, np.inf], np.float32)]
        got = run(compile_kernel(layer, config, knobs, kernels.Io(codes_in=True)), layer, args)
        np.testing.assert_array_equal(got, want, err_msg=str(knobs))


@pytest.mark.parametrize("config", INT_CONFIGS, ids=lambda c: c.name)
def test_float_and_codes_io_match_simulation(config):
    """Real weights, scales, bias and ReLU6: the compiled kernel equals the numpy simulation, with float
    input and output; with the input as codes (the same result); and handing the consumer its codes
    (bit-exact vs the model, and the float round trip's codes but at near-ties)."""
    rng = np.random.default_rng(7)
    for layer in (conv_layer(24, 16, 10, 10, 3, 2, (0, 0, 1, 1)), dense_layer(3, 96, 24),
                  conv_layer(16, 16, 8, 8, 3, 1, (1, 1, 1, 1), groups=16)):
        if kernels.family(layer, config) is None:
            continue
        weight = rng.standard_normal(layer.weight_shape).astype(np.float32)
        bias = rng.standard_normal(layer.output_shape[-1]).astype(np.float32)
        x = rng.uniform(-1, 3, layer.input_shape).astype(np.float32)
        act, consumer = ActQuant.from_range(-1, 3, config.abits), ActQuant.from_range(0, 4.5, config.abits)
        knobs = kernels.knob_space(layer, config, ISA)[0]
        packed = kernels.pack(layer, config, knobs, ISA, weight, bias, act, clamp=(0.0, 6.0))
        args = (packed.w, packed.chan, packed.q)
        floats = run(compile_kernel(layer, config, knobs), layer, (x, *args))
        want = kernels.simulate(layer, packed, x)
        np.testing.assert_allclose(floats, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert 0 <= floats.min() and floats.max() <= 6
        codes_in = run(compile_kernel(layer, config, knobs, kernels.Io(codes_in=True)), layer, (act.quantize(x), *args))
        np.testing.assert_array_equal(codes_in, floats)

        handing = kernels.pack(layer, config, knobs, ISA, weight, bias, act, (0.0, 6.0), out_act=consumer)
        codes_out = run(compile_kernel(layer, config, knobs, kernels.Io(codes_out=True)), layer,
                        (x, handing.w, handing.chan, handing.q), np.uint8)
        np.testing.assert_array_equal(codes_out, kernels.simulate(layer, handing, x))
        round_trip = consumer.quantize(floats).astype(int)
        assert np.abs(codes_out - round_trip).max() <= 1 and np.mean(codes_out != round_trip) < 0.01
        assert codes_out.max() > 0


@pytest.mark.parametrize("bits", [4, 2])
def test_low_bit_weight_scales_minimize_the_rounding_error(bits):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 3, 3, 64)).astype(np.float32) * rng.uniform(0.1, 2, (32, 1, 1, 1))
    w[0, 0, 0, 0] = 12.0        # an outlier: clipping it is cheaper than coarse steps for the rest
    codes, scale = kernels.quantize_weights(w, bits)
    qmax = 2 ** (bits - 1) - 1
    error = lambda c, s: np.square(c * s.reshape(-1, 1, 1, 1) - w).reshape(32, -1).sum(1)   # noqa: E731
    peak = np.abs(w).reshape(32, -1).max(1) / qmax
    at_peak = np.clip(np.rint(w / peak.reshape(-1, 1, 1, 1)), -qmax, qmax)
    assert np.abs(codes).max() == qmax and (scale <= peak * (1 + 1e-6)).all()
    assert (error(codes, scale) <= error(at_peak, peak) * (1 + 1e-6)).all()
    assert error(codes, scale)[0] < 0.7 * error(at_peak, peak)[0]


@pytest.mark.parametrize("groups", [1, 4])
def test_bias_correction_cancels_the_mean_output_shift_of_quantized_weights(groups):
    rng = np.random.default_rng(3)
    x = rng.normal(rng.uniform(-1, 2, 8), 1.0, (500, 8))      # 500 pixels, channels with nonzero means
    w = rng.standard_normal((12, 1, 1, 8 // groups))
    codes, scale = kernels.quantize_weights(w, 2)
    wq = codes * scale.reshape(-1, 1, 1, 1)

    def out(weight):     # a grouped 1x1 conv: [500, 12]
        og, cg = 12 // groups, 8 // groups
        return np.concatenate([x[:, g * cg:(g + 1) * cg] @ weight[g * og:(g + 1) * og, 0, 0].T for g in range(groups)], 1)
    shift = (out(wq) - out(w)).mean(0)
    assert np.abs(shift).max() > 0.05
    np.testing.assert_allclose(shift + kernels.bias_correction(w, wq, x.mean(0), groups), 0, atol=1e-5)


def test_eight_bit_weights_keep_the_full_range():
    w = np.random.default_rng(1).standard_normal((8, 27)).astype(np.float32)
    codes, scale = kernels.quantize_weights(w, 8)
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-6)
    assert (np.abs(codes).max(1) == 127).all()


@pytest.mark.parametrize("config, mcpu, instruction, groups", [
    ("W8A8", "znver4", "vpdpbusd", 1), ("W8A8", "znver3", "vpmaddubsw", 1), ("W4A8", "znver4", "vpdpbusd", 1),
    ("W4A8", "znver3", "vpaddw", 1),
    ("W2A2", "znver4", "vpopcntd", 1), ("W1A1", "znver4", "vpopcntd", 1),
    ("W4A8", "znver3", "vpmullw", 64),     # depthwise, int16 lanes
])
def test_asm_uses_the_isa(config, mcpu, instruction, groups):
    """The code generated for an AVX-512 VNNI / VPOPCNTDQ CPU uses those instructions (compiled, not run)."""
    target = parse_target(f'{{"kind": "llvm", "mcpu": "{mcpu}"}}').tvm
    layer = conv_layer(64, 64, 14, 14, 3, 1, (1, 1, 1, 1), groups)
    cfg = kernels.parse_config(config)
    knobs = kernels.knob_space(layer, cfg, kernels.isa_of(target))[0]
    lib = tvm.tirx.build(tvm.IRModule({"main": kernels.build(layer, cfg, knobs, target).with_attr("global_symbol", "main")}),
                         target=target)
    assert re.search(rf"\b{instruction}\b", lib.inspect_source("asm"))


@pytest.mark.parametrize("mcpu", ["znver3", "znver4"])
def test_accumulators_live_on_the_stack(mcpu):
    """A kernel that takes codes and hands codes on needs no buffer of its own: its accumulator tile is on the
    stack, not a TVMBackendAllocWorkspace call per tile (what a "local"-scope tile costs)."""
    target = parse_target(f'{{"kind": "llvm", "mcpu": "{mcpu}"}}').tvm
    layer = conv_layer(24, 144, 14, 14, 1, 1, (0, 0, 0, 0))
    cfg, isa = kernels.parse_config("W8A8"), kernels.isa_of(target)
    for knobs in kernels.knob_space(layer, cfg, isa):
        if knobs.tile_w * knobs.tile_o * isa.lanes * 4 < 1024:
            func = kernels.build(layer, cfg, knobs, target, kernels.Io(codes_in=True, codes_out=True))
            lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
            assert "TVMBackendAllocWorkspace" not in lib.inspect_source("asm"), knobs
