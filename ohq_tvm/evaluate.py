"""Accuracy harness: Fashion-MNIST top-1, and top-1 agreement / KL against an FP32 reference.

``python -m ohq_tvm.evaluate model.so --dataset fmnist``
``python -m ohq_tvm.evaluate model.so --dataset photos --reference model.onnx``
Works on a compiled ``.so`` or, for the baselines, an ONNX file run by onnxruntime.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import data
from .cli import ArgumentParser
from .errors import OhqError, run_cli

Predict = Callable[[np.ndarray], np.ndarray]   # batch [N, ...] -> logits [N, classes]


@dataclass(frozen=True)
class Agreement:
    top1_agreement: float   # fraction of inputs where argmax equals the reference's
    mean_kl: float          # mean KL(reference softmax || model softmax)
    top5_contains: float    # fraction where the reference top-1 is in the model's top-5


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-row KL(softmax(ref) || softmax(logits))."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def agreement(ref_logits: np.ndarray, logits: np.ndarray) -> Agreement:
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    ref_top1 = ref_logits.argmax(-1)
    return Agreement(float((logits.argmax(-1) == ref_top1).mean()),
                     float(kl_divergence(ref_logits, logits).mean()),
                     float((top5 == ref_top1[:, None]).any(-1).mean()))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(-1) == labels).mean())


def onnx_predictor(path: str | Path, threads: int = 1) -> Predict:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda xs: np.concatenate([sess.run(None, {name: x[None]})[0] for x in xs])


def predictor(path: str | Path, threads: int = 1) -> Predict:
    """A batch predictor for a compiled .so or an ONNX model (onnxruntime)."""
    path = Path(path)
    if not path.is_file():
        raise OhqError(f"{path}: no such file")
    if path.suffix == ".onnx":
        return onnx_predictor(path, threads)
    from .runtime import Model, set_threads
    set_threads(threads)
    return Model.load(path).run_batch


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m ohq_tvm.evaluate", description=__doc__)
    parser.add_argument("model", type=Path, help="compiled .so or .onnx")
    parser.add_argument("--dataset", choices=("fmnist", "photos"), required=True)
    parser.add_argument("--reference", type=Path, help="FP32 ONNX model for agreement/KL (photos)")
    parser.add_argument("-n", type=int, default=None, help="number of examples (default: all / 200 crops)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    run = predictor(args.model, args.threads)
    if args.dataset == "fmnist":
        xs, ys = data.fashion_mnist_test(args.n)
        result = {"top1": top1(run(xs), ys), "n": len(xs)}
    else:
        if args.reference is None:
            raise OhqError("--dataset photos needs --reference model.onnx (the FP32 model)")
        xs = data.photo_crops(args.n or 200, split="eval")
        result = {**asdict(agreement(onnx_predictor(args.reference)(xs), run(xs))), "n": len(xs)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
