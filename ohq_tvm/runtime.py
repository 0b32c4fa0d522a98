"""Load a compiled ``.so`` and run or time it; nothing but TVM's runtime is needed."""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tvm
from tvm import relax


_pool_sized = False


def set_threads(threads: int) -> None:
    """Resize TVM's CPU thread pool (and TVM_NUM_THREADS, for subprocesses). The pool never grows beyond
    the TVM_NUM_THREADS it was created with, so the first call creates it with every core."""
    global _pool_sized
    config = tvm.get_global_func("runtime.config_threadpool")
    if not _pool_sized:
        os.environ["TVM_NUM_THREADS"] = str(os.cpu_count() or 1)
        config(1, os.cpu_count() or 1)
        _pool_sized = True
    os.environ["TVM_NUM_THREADS"] = str(int(threads))
    config(1, int(threads))


class Model:
    """A compiled model: ``Model.load("model.so")(x)`` -> numpy output."""

    def __init__(self, executable) -> None:
        self.device = tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.device)
        self._main = self.vm["main"]

    @classmethod
    def load(cls, path: str | Path) -> "Model":
        return cls(tvm.runtime.load_module(str(path)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._main(tvm.runtime.tensor(np.ascontiguousarray(x), self.device)).numpy()

    def run_batch(self, xs: np.ndarray) -> np.ndarray:
        """Runs a batch-1 model over the leading axis of `xs` ([N, ...input shape])."""
        return np.concatenate([self(x[None]) for x in xs])

    def time_ms(self, x: np.ndarray, min_seconds: float = 0.2) -> float:
        """Median latency of one call, in ms, over repeats that together take >= min_seconds."""
        arg = tvm.runtime.tensor(np.ascontiguousarray(x), self.device)
        self._main(arg)
        return median_ms(lambda: self._main(arg), min_seconds)


def median_ms(call: Callable[[], object], min_seconds: float) -> float:
    """Median latency of `call()`, in ms, over at least 5 repeats that together take >= min_seconds."""
    samples: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(samples) < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def interleaved_runs(timers: dict, rounds: int = 7) -> dict[object, list[float]]:
    """Each timer's figure in each round; a round runs every timer once, in turn, so machine noise hits all
    alike (and a ratio of two timers is best taken within a round)."""
    runs: dict = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            time.sleep(0.05)    # let the previous system's spinning worker threads park before the next
            runs[name].append(timer())
    return runs


def interleaved(timers: dict, rounds: int = 7, statistic: Callable[[list[float]], float] = statistics.median) -> dict:
    """`statistic` over the interleaved rounds of each timer's figure."""
    return {name: statistic(values) for name, values in interleaved_runs(timers, rounds).items()}


def time_side_by_side(paths: list[str | Path], shape: tuple[int, ...], threads: int, rounds: int = 5,
                      min_seconds: float = 0.2) -> list[float]:
    """Latency (ms) of each library: the median of each round (>= min_seconds of runs), rounds interleaved,
    and the best round kept: interference (other processes, a neighbour VM) only ever slows a round down,
    and on this 2-core machine it slowed whole rounds by up to 2x."""
    set_threads(threads)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    models = [Model.load(p) for p in paths]
    best = interleaved({i: (lambda m=m: m.time_ms(x, min_seconds)) for i, m in enumerate(models)}, rounds, min)
    return [best[i] for i in range(len(models))]


def time_in_fresh_process(paths: list[str | Path], shape: tuple[int, ...], threads: int, rounds: int = 5) -> list[float]:
    """`time_side_by_side` in a new Python process: the compiler's own threads and pools (XGBoost, LLVM,
    MetaSchedule workers) made in-process timings swing by up to 2x."""
    import json
    import subprocess
    import sys
    command = [sys.executable, "-m", "ohq_tvm.runtime", *map(str, paths), "--shape", ",".join(map(str, shape)),
               "--threads", str(threads), "--rounds", str(rounds)]
    result = subprocess.run(command, capture_output=True, text=True)     # its set_threads sizes the pool
    if result.returncode != 0:
        raise RuntimeError(f"timing process failed: {result.stderr.strip()[-500:]}")
    return json.loads(result.stdout)["ms"]


def main(argv: list[str] | None = None) -> int:
    """``python -m ohq_tvm.runtime a.so [b.so ...] --shape 1,3,224,224``: latency of each, timed side by side."""
    import json
    from .cli import ArgumentParser
    from .errors import OhqError
    parser = ArgumentParser(prog="python -m ohq_tvm.runtime", description=main.__doc__)
    parser.add_argument("libraries", nargs="+", type=Path)
    parser.add_argument("--shape", required=True, help="input shape, e.g. 1,3,224,224")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for path in args.libraries:
        if not path.is_file():
            raise OhqError(f"{path}: no such file")
    try:
        shape = tuple(int(d) for d in args.shape.split(","))
    except ValueError:
        raise OhqError(f"--shape {args.shape!r}: expected comma-separated integers") from None
    ms = time_side_by_side(args.libraries, shape, args.threads, args.rounds)
    print(json.dumps({"libraries": [str(p) for p in args.libraries], "threads": args.threads, "ms": ms}))
    return 0


if __name__ == "__main__":
    from .errors import run_cli
    run_cli(main)
