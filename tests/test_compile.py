"""End to end: ONNX -> scheduled .so, outputs equal onnxruntime's; user errors are one line, exit 2."""
import json
import numpy as np
import pytest

from conftest import EFFNET, FMNIST, TUNING_LOGS, run_cli
from tvm import relax
from ohq_tvm import tune
from ohq_tvm.errors import OhqError
from ohq_tvm.frontend import load_onnx, run_onnxruntime
from ohq_tvm.runtime import Model
from ohq_tvm.target import parse_target


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Both models compiled to FP32 with the committed tuning logs (no tuning in tests)."""
    out = tmp_path_factory.mktemp("so")
    paths = {}
    for onnx_path in (FMNIST, EFFNET):
        so = out / f"{onnx_path.stem}.so"
        result = run_cli("compile", onnx_path, "--target", "llvm", "--uniform", "FP32", "--output", so,
                         "--tune-trials", "0", "--work-dir", TUNING_LOGS)
        assert result.returncode == 0, result.stderr
        paths[onnx_path] = (so, result.stderr)
    return paths


@pytest.mark.parametrize("onnx_path", [FMNIST, EFFNET], ids=["fmnist", "efficientnet"])
def test_compiled_matches_onnxruntime(compiled, onnx_path):
    so, _ = compiled[onnx_path]
    model = Model.load(so)
    shape = load_onnx(onnx_path).input_shape
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal(shape, dtype=np.float32)
        np.testing.assert_allclose(model(x), run_onnxruntime(onnx_path, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("onnx_path", [FMNIST, EFFNET], ids=["fmnist", "efficientnet"])
def test_committed_logs_schedule_every_kernel(compiled, onnx_path):
    target = parse_target("llvm")
    if not (tune.database_dir(TUNING_LOGS, target) / "database_tuning_record.json").is_file():
        pytest.skip(f"no committed tuning logs for this CPU ({target.key})")
    _, log = compiled[onnx_path]
    assert "tuned now: 0" in log
    fused = tune.fuse(load_onnx(onnx_path).mod, target)
    assert tune.missing_tasks(fused, target, TUNING_LOGS) == []


def test_fp32_kernels_are_matched_to_their_layers():
    """Fusion puts a residual block's shortcut conv before the block's second conv: matching by order swapped
    their FP32 timings; every layer gets the kernel computing its own conv."""
    from ohq_tvm.layers import find_layers
    target = parse_target("llvm")
    imported = load_onnx(FMNIST)
    layers = find_layers(imported.mod)
    scheduled = tune.apply(tune.fuse(imported.mod, target), target, TUNING_LOGS)
    matched = tune.layer_kernels(scheduled, layers)
    assert matched is not None and len(matched) == len(layers)
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    for layer, func in zip(layers, matched):
        data, weight = (tuple(int(d) for d in a.shape) for a in ArgInfo.from_prim_func(func)[:2])
        assert data == tuple(layer.input_shape) and np.prod(weight) == np.prod(layer.weight_shape), layer.id
    assert tune.layer_kernels(scheduled, layers[:-1] + [layers[0]]) is None    # a layer without its own kernel


def test_output_is_not_overwritten_without_force(tmp_path):
    so = tmp_path / "model.so"
    so.write_bytes(b"precious")
    result = run_cli("compile", FMNIST, "--output", so, "--tune-trials", "0")
    assert result.returncode == 2 and "--force" in result.stderr
    assert so.read_bytes() == b"precious"


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "no such file"),
    ([FMNIST, "--target", "cuda"], "unknown --target"),
    ([FMNIST, "--target", '{"kind": "llvm", "mcpu": 5'], "not valid JSON"),
    ([FMNIST, "--input-shape", "1,x"], "--input-shape"),
    ([FMNIST, "--bogus-flag"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    result = run_cli("compile", *args, "--output", tmp_path / "o.so", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_dynamic_model_without_shape_is_one_line_exit_2(tmp_path):
    from test_frontend import _tiny_model
    path = _tiny_model(tmp_path / "dyn.onnx", dims=("N", 4, 8, 8))
    result = run_cli("compile", path, "--output", tmp_path / "o.so", cwd=tmp_path)
    assert result.returncode == 2 and "--input-shape" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_harness_on_onnxruntime_and_compiled(compiled):
    import json
    result = run_cli("evaluate", FMNIST, "--dataset", "fmnist", "-n", "500")
    assert result.returncode == 0, result.stderr
    ort_top1 = json.loads(result.stdout)["top1"]
    assert ort_top1 >= 0.88
    so, _ = compiled[FMNIST]
    ours = json.loads(run_cli("evaluate", so, "--dataset", "fmnist", "-n", "500").stdout)
    assert ours["top1"] == ort_top1          # FP32 module: same predictions as onnxruntime
    photos = run_cli("evaluate", compiled[EFFNET][0], "--dataset", "photos", "--reference", EFFNET, "-n", "8")
    agreement = json.loads(photos.stdout)
    assert agreement["top1_agreement"] == 1.0 and agreement["mean_kl"] < 1e-6


def test_injective_kernels_get_the_fixed_rule_not_a_search():
    """MQE's fake quantizer (a strided slice of the mask, then round/clamp/scale) is injective: it is not a
    tuning task, and the rule's schedule (one parallel, vectorized loop nest) computes the same values."""
    import tvm
    from tvm import relax
    from ohq_tvm.mqe import _fake_quant
    target = parse_target("llvm")
    x = relax.Var("x", relax.TensorType((1, 28, 28, 16), "float32"))
    aq = relax.Var("aq", relax.TensorType((3, 5), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, aq]):
        with bb.dataflow():
            row = [bb.emit(relax.op.strided_slice(aq, [0, 1], [1, j], [2, j + 1])) for j in range(5)]
            out = bb.emit_output(_fake_quant(x, *row))
        bb.emit_func_output(out)
    fused = tune.fuse(bb.get(), target)
    assert tune._tasks(fused, target) == []
    scheduled = tune.ScheduleUntuned(fused)
    kernels = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and kernels[0].attrs["tirx.is_scheduled"]
    script = kernels[0].script()
    assert "T.parallel" in script and "T.vectorized" in script and script.count("T.sblock(") == 2, script  # root and one stage
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((1, 28, 28, 16), dtype=np.float32) * 3,
            np.tile(np.array([4.0, 7.0, 15.0, 1.0, 0.25], np.float32), (3, 1))]
    results = _run((fused, scheduled), target, *args)
    np.testing.assert_array_equal(results[0], results[1])
    q = np.clip(np.round(args[0] * 4.0) + 7.0, 0, 15)
    np.testing.assert_allclose(results[1], (q - 7.0) * 0.25, rtol=0, atol=1e-6)


def _run(mods, target, *args) -> list[np.ndarray]:
    """Each module of `mods` built for `target` and run on the same numpy `args`."""
    import tvm
    from ohq_tvm import build
    tensors = [tvm.runtime.tensor(a) for a in args]
    return [relax.VirtualMachine(build.compile_module(m, target), tvm.cpu())["main"](*tensors).numpy() for m in mods]


def _one_op_module(shapes: list[tuple[int, ...]], op, name: str = "x") -> "tvm.IRModule":
    """main(x0, x1, ...) = op(x0, x1, ...) over float32 tensors of `shapes`."""
    xs = [relax.Var(f"{name}{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    bb = relax.BlockBuilder()
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(op(*xs))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("shapes, op, lanes", [
    ([(1, 3, 224, 224)], lambda x: relax.op.permute_dims(x, [0, 2, 3, 1]), None),   # 3 channels: unrolled
    ([(1, 56, 56, 24), (1, 56, 56, 24)], relax.op.add, 8),
    ([(1, 64, 56, 56), (1, 64, 1, 1)], relax.op.add, 8),
    ([(1, 7, 7, 1280)], lambda x: relax.op.permute_dims(x, [0, 3, 1, 2]), 7),      # odd row: one 7-lane vector
    ([(1, 1, 65536)], lambda x: relax.op.clip(x, 0, 6), 16),
])
def test_injective_rule_vectorizes_rows_not_across_them(shapes, op, lanes):
    """The rule's lanes stay inside the innermost loop (a row), whatever the shape: values as numpy's."""
    import tvm
    rng = np.random.default_rng(0)
    mod = _one_op_module(shapes, op)
    func = next(f for f in relax.transform.LegalizeOps()(mod).functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    scheduled = tune.schedule_untuned(func)
    script = scheduled.script()
    assert (f"T.vectorized(T.int64({lanes}))" in script) if lanes else ("T.unroll(T.int64(3))" in script and "T.vectorized" not in script), script
    lib = tvm.tirx.build(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target=parse_target("llvm").tvm)
    args = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    reference = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())["main"](
        *[tvm.runtime.tensor(a) for a in args]).numpy()
    result = tvm.runtime.tensor(np.zeros(reference.shape, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args], result)
    np.testing.assert_array_equal(result.numpy(), reference)


_nchw = dict(data_layout="NCHW", kernel_layout="OIHW")


@pytest.mark.parametrize("shapes, op, tiled", [
    ([(8, 16, 28, 28), (32, 16, 3, 3)], lambda x, w: relax.op.nn.conv2d(x, w, padding=1, **_nchw), True),
    ([(2, 24, 29, 29), (48, 24, 1, 1)], lambda x, w: relax.op.nn.conv2d(x, w, strides=2, **_nchw), True),
    ([(2, 32, 14, 14), (32, 1, 3, 3)], lambda x, w: relax.op.nn.conv2d(x, w, padding=1, groups=32, **_nchw), True),
    ([(2, 32, 14, 14), (32, 8, 3, 3)],      # a stride-2 conv's input gradient
     lambda x, w: relax.op.nn.conv2d_transpose(x, w, strides=2, padding=1, output_padding=1), True),
    ([(1, 14, 14, 64)], lambda x: relax.op.nn.max_pool2d(x, 3, 2, 1, layout="NHWC"), True),
    ([(16, 256), (96, 256)], lambda x, w: relax.op.matmul(x, relax.op.permute_dims(w)), True),
    ([(1, 256), (256, 96)], relax.op.matmul, True),
    ([(8, 24, 56, 56)], lambda x: relax.op.mean(x, axis=[0, 2, 3]), True),
    ([(4, 1000)], relax.op.nn.softmax, True),
    ([(3, 7)], lambda x: relax.op.sum(x), False),                      # no spatial axis: left as lowered
])
def test_reductions_without_a_record_get_the_tiling_rule(shapes, op, tiled):
    """A reducing kernel no tuning record covers (the distillation's gradient module, a cross-compiled
    target) is tiled by the fixed rule, and computes what TVM's own lowering computes."""
    import tvm
    rng = np.random.default_rng(0)
    mod = _one_op_module(shapes, op)
    target = parse_target("llvm")
    fused = tune.fuse(mod, target)
    scheduled = tune.ScheduleUntuned(fused)      # a pass: `fused` itself stays as lowered
    kernels = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and all(f.attrs["tirx.is_scheduled"] for f in kernels)
    script = "\n".join(f.script() for f in kernels)
    assert ('_init")' in script) == tiled, script    # the rule's last step splits off the reduction's init
    ref, got = _run((fused, scheduled), target, *[rng.standard_normal(s, dtype=np.float32) for s in shapes])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape, strides, padding", [
    ((1, 28, 28, 16), (32, 3, 3, 16), 1, 1),
    ((1, 7, 7, 40), (24, 1, 1, 40), 1, 0),         # a 7-wide row: blocked whole
    ((2, 15, 15, 8), (20, 3, 3, 8), 2, 1),
    ((1, 14, 14, 32), (32, 5, 5, 1), 1, 2),        # depthwise
])
def test_nhwc_conv_without_a_record_reads_its_weight_output_channels_last(tmp_path, x_shape, w_shape, strides,
                                                                          padding):
    """The rule puts a constant OHWI weight in HWIO layout, blocked by the vector lanes when the output channels
    are split (folded at build), and vectorizes the output channels."""
    groups = x_shape[-1] if w_shape[-1] == 1 else 1
    import tvm
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal(w_shape, dtype=np.float32))
    mod = _one_op_module([x_shape], lambda x: relax.op.nn.conv2d(
        x, w, strides, padding, groups=groups, data_layout="NHWC", kernel_layout="OHWI"))
    target = parse_target("llvm")
    fused = tune.fuse(mod, target)
    scheduled = tune.apply(fused, target, tmp_path)        # an empty work dir: no records
    [conv] = [f for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in f.script()]
    o, kh, kw, i = w_shape
    shapes = [tuple(int(d) for d in p.shape) for p in conv.params]
    lanes = [s[-1] for s in shapes if s == (kh, kw, i, o) or (len(s) == 5 and s == (o // s[-1], kh, kw, i, s[-1]))]
    assert lanes, shapes        # HWIO, or blocked by the vector's lanes: O/lanes x kh x kw x I x lanes
    assert "T.vectorized" in conv.script() and "layout_rewrite_preproc" not in conv.script()
    ref, got = _run((fused, scheduled), target, rng.standard_normal(x_shape, dtype=np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("registers, extent, width, broadcast, tile", [
    ((16, 8), 7, 1152, True, (7, 8)),       # AVX2, a 7x7 1x1 conv: 7 x 16 would spill an accumulator
    ((16, 8), 56, 24, True, (4, 24)),       # 3 registers of output channels share each broadcast input
    ((16, 8), 56, 144, False, (8, 8)),      # depthwise: an input vector per accumulator, one weight vector
    ((32, 16), 7, 1152, True, (7, 48)),     # AVX-512
    ((32, 4), 14, 672, True, (7, 12)),      # NEON aarch64
    ((16, 8), 7, 10, True, (7, 10)),        # 10 channels: one whole-row vector
])
def test_register_tile_fits_the_target_register_file(registers, extent, width, broadcast, tile):
    """The accumulator tile is sized for the target's vector registers: accumulators, the weight vectors and
    one input fit, and it is the tile that loads least per multiply-add."""
    columns, lanes, unit = tune._register_tile(extent, width, tune.Registers(*registers), broadcast)
    assert (columns, lanes) == tile
    assert extent % columns == 0 and width % lanes == 0 and lanes % unit == 0
    if unit == registers[1]:
        assert columns * (lanes // unit) + lanes // unit + 1 <= registers[0]


def test_registers_follow_the_target():
    import tvm
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    assert tune.Registers.of(avx512) == tune.Registers(32, 16)
    assert tune.Registers.of(tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})) == tune.Registers(16, 8)
    assert tune.Registers.of(parse_target("aarch64").tvm) == tune.Registers(32, 4)
    assert tune.Registers.of(parse_target("armv7").tvm) == tune.Registers(16, 4)


@pytest.mark.parametrize("x_shape, w_shape, padding, pad_inlined", [
    ((1, 56, 56, 16), (96, 1, 1, 16), 0, True),       # 1x1: the unpadded copy is inlined
    ((1, 28, 28, 48), (48, 3, 3, 1), 1, True),        # depthwise: read as channel vectors, one check per vector
    ((1, 28, 28, 16), (32, 3, 3, 16), 1, False),      # dense 3x3: read one broadcast scalar at a time
])
def test_rule_computes_the_epilogue_in_the_tile_and_inlines_padding_only_where_lanes_agree(
        x_shape, w_shape, padding, pad_inlined):
    """A conv + bias + ReLU6 kernel (EfficientNet-Lite0's): the epilogue is applied as the accumulator tile is
    written back (no full-size intermediate pass), the tile stays on the stack (no workspace allocation in
    the parallel loop), a padding stage is inlined only where every lane of a vector takes the same branch; values as
    TVM's own lowering."""
    import tvm
    from tvm import s_tir
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal(w_shape, dtype=np.float32))
    b = relax.const(rng.standard_normal((1, 1, 1, w_shape[0]), dtype=np.float32))
    groups = x_shape[-1] if w_shape[-1] == 1 else 1
    mod = _one_op_module([x_shape], lambda x: relax.op.clip(relax.op.add(relax.op.nn.conv2d(
        x, w, 1, padding, groups=groups, data_layout="NHWC", kernel_layout="OHWI"), b), 0, 6))
    target = parse_target("llvm")
    fused = tune.fuse(mod, target)
    [func] = [f for f in fused.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in f.script()]
    with target.tvm:
        kernel = tune.schedule_untuned(func)
    blocks = [line.split('"')[1] for line in kernel.script().splitlines() if "T.sblock(" in line]
    assert not any(name.startswith("T_") for name in blocks), blocks       # bias and clamp in the write-back
    assert ("pad_temp" not in blocks) == pad_inlined, blocks
    lib = tvm.tirx.build(s_tir.transform.RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")})), target=target.tvm)
    bodies = [f.split("\n}\n")[0] for f in lib.inspect_source("ll").split("\ndefine ")[1:]]
    tiles = [f for f in bodies if "parallel_lambda" in f.split("(")[0]]
    assert tiles and not any("AllocWorkspace" in f for f in tiles)      # per tile: a "local" buffer did that
    scheduled = tune.ScheduleUntuned(fused)
    ref, got = _run((fused, scheduled), target, rng.standard_normal(x_shape, dtype=np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_the_rule_is_a_timed_tuning_record_that_replays(tmp_path):
    """Tuning times the fixed rule like a search candidate and commits it as a record; the database reloads
    and `apply` replays it, also on a structurally equal kernel whose blocks are named differently."""
    import tvm
    import tvm.s_tir.meta_schedule as ms
    rng = np.random.default_rng(0)
    w = relax.const(rng.standard_normal((16, 3, 3, 16), dtype=np.float32))
    target = parse_target("llvm")

    def conv_mean(x):       # the mean's reduction block is named after its input, x0 or y0
        y = relax.op.nn.conv2d(x, w, padding=1, data_layout="NHWC", kernel_layout="OHWI")
        return relax.op.add(y, relax.op.mean(x, axis=[1, 2], keepdims=True))
    first, second = (tune.fuse(_one_op_module([(1, 14, 14, 16)], conv_mean, name), target) for name in "xy")
    stats = tune.tune(first, target, tmp_path, trials_per_task=0, rule_everywhere=True)
    assert (stats.tasks, stats.tuned, stats.untuned, stats.rule_best) == (2, 0, 0, 2)     # the only records
    tune.tune(second, target, tmp_path, trials_per_task=0, rule_everywhere=True)    # timed again: the same trace
    path = tune.database_dir(tmp_path, target)
    assert len((path / "database_workload.json").read_text().splitlines()) == 2
    records = ms.database.JSONDatabase(work_dir=str(path), module_equality="structural").get_all_tuning_records()
    assert len(records) == 2 and all(len(r.run_secs) == 5 and float(r.run_secs[0]) > 0 for r in records)
    # records of another runner are timed again in place
    records_file = path / "database_tuning_record.json"
    rows = [json.loads(line) for line in records_file.read_text().splitlines()]
    records_file.write_text("".join(json.dumps([w, [trace, [9.0], *rest]]) + "\n" for w, (trace, _, *rest) in rows))
    assert tune.retime(tmp_path, target) == (2, 0)
    again = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert [(w, trace) for w, (trace, *_) in again] == [(w, trace) for w, (trace, *_) in rows]
    assert all(len(secs) == 5 and 0 < max(secs) < 0.1 for _, (_, secs, *_) in again)
    scheduled = tune.apply(second, target, tmp_path)
    assert "T.vectorized" in "\n".join(f.script() for f in scheduled.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    ref, got = _run((second, scheduled), target, rng.standard_normal((1, 14, 14, 16), dtype=np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_tuning_database_is_parsed_once_while_its_files_are_unchanged(tmp_path):
    target = parse_target("llvm")
    path = tune.database_dir(tmp_path, target)
    path.mkdir(parents=True)
    (path / "database_workload.json").write_text("")
    (path / "database_tuning_record.json").write_text("")
    first = tune._database(tmp_path, target)
    assert tune._database(tmp_path, target) is first
    (path / "database_workload.json").write_text("not a record\n")      # changed: read (and checked) again
    with pytest.raises(OhqError, match="line 1 is corrupt"):
        tune._database(tmp_path, target)
