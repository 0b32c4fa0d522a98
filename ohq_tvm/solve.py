"""Bit-width selection as a 0-1 ILP (HiGHS via scipy.optimize.milp): one candidate per layer, least summed
sensitivity within a latency budget and an optional weight-size budget. Budgets include `Problem.fixed_ms`."""
from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from .errors import OhqError


@dataclass(frozen=True)
class Option:
    """One available candidate of one layer."""
    config: str       # e.g. "W8A8"
    ms: float
    loss: float       # sensitivity
    bytes: int        # weight bytes


@dataclass(frozen=True)
class Problem:
    options: dict[str, list[Option]]               # layer id -> available options, in a stable order
    fixed_ms: float = 0.0                          # latency of everything not quantizable
    ties: tuple[tuple[str, ...], ...] = ()         # groups of layers that must choose the same config
    allowed: dict[str, frozenset[str]] = field(default_factory=dict)   # layer -> the configs it may take (--exclude)


@dataclass(frozen=True)
class Solution:
    config: dict[str, str]                         # layer id -> chosen config
    ms: float                                      # predicted total incl. fixed_ms
    loss: float
    bytes: int


@contextmanager
def _c_stdout_silenced():
    """HiGHS 1.12 (scipy's) printf()s a stray debug line on some solves (ERGO-Code/HiGHS#2783); drop C-level stdout."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        for fd in (saved, null):
            os.close(fd)


class _Ilp:
    """One binary per (layer, allowed option); the one-hot and tie rows every solve shares."""

    def __init__(self, problem: Problem) -> None:
        if not problem.options:
            raise OhqError("no quantizable layers to choose a configuration for")
        unknown = ({l for group in problem.ties for l in group} | set(problem.allowed)) - set(problem.options)
        if unknown:
            raise OhqError(f"unknown layer(s) in ties or exclusions: {', '.join(sorted(unknown))}")
        self.problem = problem
        self.vars = [(layer, o) for layer, opts in problem.options.items() for o in opts
                     if o.config in problem.allowed.get(layer, (o.config,))]
        column = {(layer, o.config): j for j, (layer, o) in enumerate(self.vars)}
        rows = {layer: [j for j, (l, _) in enumerate(self.vars) if l == layer] for layer in problem.options}
        for layer, cols in rows.items():
            if not cols:
                among = f" among {', '.join(sorted(problem.allowed[layer]))}" if layer in problem.allowed else ""
                raise OhqError(f"layer {layer} has no available candidate{among}")
        self.one_hot = self._matrix([{j: 1.0 for j in cols} for cols in rows.values()])
        tie_rows = []   # x[a, c] == x[b, c] for each config c either layer has (a missing variable counts as 0)
        for group in problem.ties:
            for a, b in zip(group, group[1:]):
                for config in dict.fromkeys(c for l, c in column if l in (a, b)):
                    row = {column[a, config]: 1.0} if (a, config) in column else {}
                    if (b, config) in column:
                        row[column[b, config]] = -1.0
                    tie_rows.append(row)
        self.ties = self._matrix(tie_rows) if tie_rows else None
        self.ms = np.array([o.ms for _, o in self.vars], dtype=float)
        self.loss = np.array([o.loss for _, o in self.vars], dtype=float)
        self.bytes = np.array([o.bytes for _, o in self.vars], dtype=float)

    def _matrix(self, rows: list[dict[int, float]]) -> csr_array:
        r, c, v = zip(*[(i, j, x) for i, row in enumerate(rows) for j, x in row.items()])
        return csr_array((v, (r, c)), shape=(len(rows), len(self.vars)))

    def minimize(self, primary: np.ndarray, secondary: np.ndarray, ms_budget: float | None = None,
                 bytes_budget: float | None = None, loss_budget: float | None = None) -> Solution | None:
        """Minimize `primary`, ties broken by a tiny weight on `secondary`; None if infeasible."""
        # Normalized so HiGHS's absolute gap (1e-6) is far below the tie-break step and loss steps dominate it.
        # (Shifting every variable by one constant is harmless: exactly one variable per layer is 1.)
        scale = lambda a: (a - a.min()) / max(np.ptp(a), 1e-30)   # noqa: E731
        objective = 1e6 * scale(primary) + scale(secondary)
        constraints = [LinearConstraint(self.one_hot, 1, 1)]
        if self.ties is not None:
            constraints.append(LinearConstraint(self.ties, 0, 0))
        for weights, budget in ((self.ms, ms_budget), (self.bytes, bytes_budget), (self.loss, loss_budget)):
            if budget is not None:   # a hair of slack so a budget equal to a reported minimum is feasible
                constraints.append(LinearConstraint(weights[None], -np.inf, budget + 1e-9 * max(1.0, abs(budget))))
        with _c_stdout_silenced():
            result = milp(objective, integrality=np.ones(len(self.vars)), bounds=Bounds(0, 1), constraints=constraints,
                          options={"mip_rel_gap": 0.0})
        if result.x is None:
            return None
        chosen = [self.vars[j] for j in np.flatnonzero(result.x > 0.5)]
        return Solution({layer: o.config for layer, o in chosen}, self.problem.fixed_ms + sum(o.ms for _, o in chosen),
                        sum(o.loss for _, o in chosen), sum(o.bytes for _, o in chosen))


def _up(value: float, digits: int = 3) -> float:
    return math.ceil(value * 10**digits - 1e-6) / 10**digits


def solve(problem: Problem, latency_budget_ms: float | None = None, size_budget_bytes: int | None = None) -> Solution:
    """The least-sensitive configuration within the budgets (faster wins among equal sensitivity)."""
    ilp = _Ilp(problem)
    ms_budget = None if latency_budget_ms is None else latency_budget_ms - problem.fixed_ms
    found = ilp.minimize(ilp.loss, ilp.ms, ms_budget, size_budget_bytes)
    if found is not None:
        return found
    if (smallest := ilp.minimize(ilp.bytes, ilp.ms)) is None:
        raise OhqError("no configuration satisfies the tie constraints and exclusions")
    if size_budget_bytes is not None and smallest.bytes > size_budget_bytes:
        raise OhqError(f"size budget {size_budget_bytes} bytes is infeasible; "
                       f"the smallest feasible is {smallest.bytes}")
    fastest = ilp.minimize(ilp.ms, ilp.loss, None, size_budget_bytes)
    raise OhqError(f"latency budget {latency_budget_ms:g} ms is infeasible; the smallest feasible budget is "
                   f"{_up(fastest.ms)} ms")


def evaluate(problem: Problem, config: dict[str, str]) -> Solution:
    """A given configuration's predicted latency, summed loss and size."""
    chosen = [next(o for o in problem.options[layer] if o.config == name) for layer, name in config.items()]
    return Solution(dict(config), problem.fixed_ms + sum(o.ms for o in chosen), sum(o.loss for o in chosen),
                    sum(o.bytes for o in chosen))


def fastest_checked(problem: Problem, accept: Callable[[dict[str, str]], bool], fallback: dict[str, str],
                    size_budget_bytes: int | None = None, steps: int = 7) -> Solution:
    """The fastest configuration `accept` passes (e.g. a whole-model loss check), else `fallback` (which it
    is assumed to pass).

    Summed per-layer losses underestimate how errors compound, so the cap on them is a knob, not a promise:
    bisect it (log scale) between the least feasible cap (or a 64th of the fallback's) and the unconstrained
    fastest configuration's, keeping the fastest configuration the check passes. `accept` runs <= steps + 1 times."""
    ilp = _Ilp(problem)
    top = ilp.minimize(ilp.ms, ilp.loss, None, size_budget_bytes)
    if top is None:
        solve(problem, None, size_budget_bytes)   # raises the explanatory error for sizes and ties
    if accept(top.config):
        return top
    best = evaluate(problem, fallback)
    if size_budget_bytes is not None and best.bytes > size_budget_bytes:
        best = None
    least = ilp.minimize(ilp.loss, ilp.ms, None, size_budget_bytes)
    floor = max(least.loss, (best or least).loss / 64, 1e-12)
    lo, hi = math.log(floor), math.log(max(top.loss, floor * 2))
    for _ in range(steps):
        mid = (lo + hi) / 2
        found = ilp.minimize(ilp.ms, ilp.loss, None, size_budget_bytes, math.exp(mid))
        if found is not None and accept(found.config):
            best = found if best is None or found.ms < best.ms else best
            lo = mid
        else:
            hi = mid
    if best is None:
        raise OhqError(f"no configuration within the size budget ({size_budget_bytes} bytes) passes the check")
    return best


def pareto(problem: Problem, n: int, size_budget_bytes: int | None = None) -> list[Solution]:
    """Non-dominated solutions from `n` budgets spaced from the fastest feasible latency to the latency of the
    least-sensitive assignment (both ends included; n == 1 gives the least-sensitive one only)."""
    if n < 1:
        raise OhqError(f"--pareto needs at least 1 point, got {n}")
    ilp = _Ilp(problem)
    fastest = ilp.minimize(ilp.ms, ilp.loss, None, size_budget_bytes)
    best = ilp.minimize(ilp.loss, ilp.ms, None, size_budget_bytes)
    if fastest is None or best is None:
        solve(problem, None, size_budget_bytes)   # raises the explanatory error
    if n == 1:
        return [best]
    found = [fastest, best] + [ilp.minimize(ilp.loss, ilp.ms, b - problem.fixed_ms, size_budget_bytes)
                               for b in np.linspace(fastest.ms, best.ms, n)[1:-1]]
    front: list[Solution] = []
    for s in sorted((s for s in found if s is not None), key=lambda s: (s.ms, s.loss)):
        if not front or s.loss < front[-1].loss:
            front.append(s)
    return front


def parse_budget(text: str, uniform_int8_ms: float) -> float:
    """`--latency-budget`: "12.5ms" is absolute; a bare number <= 3 is a fraction of the uniform-INT8 latency."""
    match = re.fullmatch(r"\s*([-+0-9.eE]+)\s*(ms)?\s*", text.lower())
    try:
        value = float(match[1]) if match else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise OhqError(f"latency budget {text!r} is not a number: write e.g. 0.75 (of uniform INT8) or 12.5ms")
    if value <= 0:
        raise OhqError(f"latency budget must be positive, got {text!r}")
    if match[2]:
        return value
    if value > 3:
        raise OhqError(f"latency budget {text!r} is ambiguous: a bare number is a fraction of uniform INT8 (<= 3); "
                       f"add 'ms' for milliseconds")
    return value * uniform_int8_ms
