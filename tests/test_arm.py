"""ARM: every family cross-compiles for aarch64 and armv7 and runs bit-exact under qemu-user."""
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tvm
import tvm_ffi

from ohq_tvm import kernels
from ohq_tvm.target import parse_target
from test_kernels import conv_layer, dense_layer, exact_case

BOARDS = {"aarch64": ("qemu-aarch64-static", "/usr/aarch64-linux-gnu"),
          "armv7": ("qemu-arm-static", "/usr/arm-linux-gnueabihf")}
ELF_MACHINE = {"aarch64": "ARM aarch64", "armv7": "ARM, EABI5"}
DTYPES = {np.dtype(np.float32): (2, 32), np.dtype(np.int8): (0, 8), np.dtype(np.uint8): (1, 8),
          np.dtype(np.uint32): (1, 32)}
CASES = [("W8A8", conv_layer(20, 16, 9, 9, 3, 2, (1, 1, 1, 1))), ("W4A8", dense_layer(3, 40, 24)),
         ("W2A2", conv_layer(40, 8, 7, 7, 3, 1, (1, 1, 1, 1))), ("W1A1", dense_layer(1, 64, 16)),
         ("W8A8", conv_layer(24, 24, 8, 8, 3, 1, (1, 1, 1, 1), groups=24))]


def serialize(arrays, path: Path) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(arrays)))
        for a in arrays:
            code, bits = DTYPES[a.dtype]
            f.write(struct.pack(f"<BBi{a.ndim}q", code, bits, a.ndim, *a.shape))
            f.write(np.ascontiguousarray(a).tobytes())


@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("config_name, layer", CASES, ids=[f"{c}-{l.kind}" for c, l in CASES])
def test_kernel_runs_bit_exact_under_qemu(board, config_name, layer, tmp_path):
    target = parse_target(board)
    qemu, sysroot = BOARDS[board]
    if shutil.which(qemu) is None or shutil.which(target.cross_cc) is None:
        pytest.skip(f"needs {qemu} and {target.cross_cc} (make setup installs them)")
    config, isa = kernels.parse_config(config_name), kernels.isa_of(target.tvm)
    knobs = kernels.knob_space(layer, config, isa)[0]
    func = kernels.build(layer, config, knobs, target.tvm)
    lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target.tvm)
    so = tmp_path / "kernel.so"
    lib.export_library(str(so), fcompile=tvm.support.cc.cross_compiler(target.cross_cc))
    assert ELF_MACHINE[board] in subprocess.run(["file", str(so)], capture_output=True, text=True).stdout
    driver = tmp_path / "driver"
    include = Path(tvm_ffi.__file__).parent / "include"
    subprocess.run([target.cross_cc, "-O1", "-std=c11", f"-I{include}", str(Path(__file__).parent / "arm_driver.c"),
                    str(so), "-lm", "-o", str(driver), "-Wl,-rpath,$ORIGIN"], check=True)

    args, want = exact_case(layer, config, knobs, isa, np.random.default_rng(3))
    serialize([*args, np.zeros(layer.output_shape, np.float32)], tmp_path / "in.bin")
    run = subprocess.run([qemu, "-L", sysroot, str(driver), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.bin", np.float32).reshape(want.shape), want)
