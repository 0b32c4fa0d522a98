"""Load a compiled ``.so`` and run or time it; nothing but TVM's runtime is needed."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import tvm
from tvm import relax


def set_threads(threads: int) -> None:
    """Resize TVM's CPU thread pool (TVM_NUM_THREADS only applies at its first use)."""
    tvm.get_global_func("runtime.config_threadpool")(1, int(threads))


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
        samples: list[float] = []
        deadline = time.perf_counter() + min_seconds
        while len(samples) < 5 or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            self._main(arg)
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3
