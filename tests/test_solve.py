import itertools
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ohq_tvm.errors import OhqError
from ohq_tvm.solve import Option, Problem, Solution, evaluate, fastest_checked, parse_budget, pareto, solve

CONFIGS = ("FP32", "W8A8", "W4A8", "W2A8")


def layer(*rows: tuple[str, float, float, int]) -> list[Option]:
    return [Option(*row) for row in rows]


# Hand-checkable: a, b each 1 ms slower and less lossy at higher precision.
SMALL = Problem({
    "a": layer(("FP32", 4.0, 0.0, 400), ("W8A8", 2.0, 1.0, 100), ("W4A8", 1.0, 5.0, 50)),
    "b": layer(("FP32", 3.0, 0.0, 300), ("W8A8", 2.0, 2.0, 75), ("W4A8", 1.5, 3.0, 38)),
}, fixed_ms=10.0)


def assignments(problem: Problem):
    """Every assignment the constraints allow, as Solutions (brute force reference)."""
    layers = list(problem.options)
    allowed = [[o for o in problem.options[l] if o.config in problem.allowed.get(l, {o.config})] for l in layers]
    for combo in itertools.product(*allowed):
        config = {l: o.config for l, o in zip(layers, combo)}
        if all(len({config[l] for l in group}) == 1 for group in problem.ties):
            yield Solution(config, problem.fixed_ms + sum(o.ms for o in combo), sum(o.loss for o in combo),
                           sum(o.bytes for o in combo))


def budget_in(message: str) -> float:
    return float(re.search(r"smallest feasible budget is ([0-9.]+) ms", message)[1])


def test_known_optimum():
    assert solve(SMALL) == Solution({"a": "FP32", "b": "FP32"}, 17.0, 0.0, 700)
    assert solve(SMALL, 15.0).config == {"a": "W8A8", "b": "FP32"}      # loss 1 beats b@W8A8's 2
    assert solve(SMALL, 14.0).config == {"a": "W8A8", "b": "W8A8"}      # 14 ms: loss 3 (a W4A8 + b FP32: 5)
    s = solve(SMALL, 12.5)
    assert (s.config, s.ms, s.loss, s.bytes) == ({"a": "W4A8", "b": "W4A8"}, 12.5, 8.0, 88)


def test_size_budget():
    assert solve(SMALL, size_budget_bytes=400).config == {"a": "W8A8", "b": "FP32"}
    assert solve(SMALL, size_budget_bytes=175).config == {"a": "W8A8", "b": "W8A8"}
    with pytest.raises(OhqError, match="size budget 80 bytes is infeasible; the smallest feasible is 88"):
        solve(SMALL, size_budget_bytes=80)


def test_infeasible_names_smallest_budget():
    with pytest.raises(OhqError) as error:
        solve(SMALL, 12.0)
    message = str(error.value)
    assert "\n" not in message and "12 ms is infeasible" in message and budget_in(message) == 12.5
    assert solve(SMALL, budget_in(message)).ms == 12.5
    with pytest.raises(OhqError) as error:   # the smallest budget respects the size budget and the exclusions
        solve(Problem(SMALL.options, 10.0, allowed={"a": frozenset({"FP32", "W8A8"})}), 12.0, size_budget_bytes=200)
    assert budget_in(str(error.value)) == 13.5


def test_exclusions_and_ties():
    kept = Problem(SMALL.options, SMALL.fixed_ms, allowed={"a": frozenset({"FP32", "W8A8"})})
    assert solve(kept, 13.5).config == {"a": "W8A8", "b": "W4A8"}
    tied = Problem(SMALL.options, SMALL.fixed_ms, ties=(("a", "b"),))
    assert solve(tied, 15.0).config == {"a": "W8A8", "b": "W8A8"}
    with pytest.raises(OhqError, match="smallest feasible budget is 14.0 ms"):   # W4A8 for both is 12.5 ms, and a
        solve(Problem(tied.options, 10.0, tied.ties, {"b": frozenset({"FP32", "W8A8"})}), 12.5)  # tied to b
    with pytest.raises(OhqError, match="layer a has no available candidate among W2A8"):
        solve(Problem(SMALL.options, allowed={"a": frozenset({"W2A8"})}))
    with pytest.raises(OhqError, match="no quantizable layers"):
        solve(Problem({}))
    with pytest.raises(OhqError, match="unknown layer"):
        solve(Problem(SMALL.options, ties=(("a", "nope"),)))


def test_tie_in_sensitivity_picks_the_faster():
    options = {f"l{i}": layer(("FP32", 3.0, 0.0, 4), ("W8A8", 1.0, 0.0, 1), ("W4A8", 2.0, 0.0, 1)) for i in range(5)}
    for _ in range(3):
        assert set(solve(Problem(options)).config.values()) == {"W8A8"}


@st.composite
def problems(draw):
    n_layers = draw(st.integers(1, 4))
    options = {}
    for i in range(n_layers):
        configs = draw(st.lists(st.sampled_from(CONFIGS), min_size=1, max_size=4, unique=True))
        options[f"l{i}"] = [Option(c, draw(st.floats(0.1, 10)), draw(st.floats(0, 5)), draw(st.integers(1, 1000)))
                            for c in configs]
    layers = list(options)
    tie = n_layers > 1 and draw(st.booleans())
    ties = (tuple(draw(st.lists(st.sampled_from(layers), min_size=2, max_size=3, unique=True))),) if tie else ()
    allowed = {l: frozenset(draw(st.lists(st.sampled_from([o.config for o in options[l]]), min_size=1, unique=True)))
               for l in draw(st.lists(st.sampled_from(layers), max_size=2, unique=True))}
    return Problem(options, draw(st.floats(0, 5)), ties, allowed)


@settings(max_examples=150, deadline=None)
@given(problems(), st.floats(0, 1), st.floats(0, 1) | st.none())
def test_matches_brute_force(problem, latency_fraction, size_fraction):
    every = list(assignments(problem))
    if not every:
        with pytest.raises(OhqError, match="tie constraints"):
            solve(problem)
        return
    ms = [s.ms for s in every]
    budget = min(ms) - 0.5 + (max(ms) - min(ms) + 1) * latency_fraction
    sizes = [s.bytes for s in every]
    size = None if size_fraction is None else int(min(sizes) + (max(sizes) - min(sizes)) * size_fraction)
    feasible = [s for s in every if s.ms <= budget + 1e-9 and (size is None or s.bytes <= size)]
    if not feasible:
        with pytest.raises(OhqError) as error:
            solve(problem, budget, size)
        fastest = min(s.ms for s in every if size is None or s.bytes <= size)
        smallest = budget_in(str(error.value))
        assert fastest - 1e-9 <= smallest <= fastest + 0.001 and solve(problem, smallest, size).ms <= smallest + 1e-9
        return
    got = solve(problem, budget, size)
    assert got in every and got.ms <= budget + 1e-9 and (size is None or got.bytes <= size)
    best = min(s.loss for s in feasible)
    assert got.loss <= best + 1e-6 * (1 + best)
    # among the (near-)least lossy, the fastest
    assert got.ms <= min(s.ms for s in feasible if s.loss <= got.loss + 1e-9) + 1e-9


@settings(max_examples=50, deadline=None)
@given(problems(), st.integers(2, 6))
def test_pareto_is_monotone_and_non_dominated(problem, n):
    every = list(assignments(problem))
    if not every:
        return
    front = pareto(problem, n)
    assert front and all(s in every for s in front)
    for faster, slower in zip(front, front[1:]):
        assert faster.ms < slower.ms and faster.loss > slower.loss       # latency up => loss down
    assert front[-1].loss <= min(s.loss for s in every) + 1e-6            # ends at the least-sensitive assignment
    assert abs(front[0].ms - min(s.ms for s in every)) < 1e-9             # starts at the fastest
    for s in front:
        assert not any(o.ms < s.ms - 1e-9 and o.loss < s.loss - 1e-6 for o in every)


def test_pareto_small():
    front = pareto(SMALL, 8)
    assert [(s.ms, s.loss) for s in front] == [(12.5, 8.0), (13.0, 7.0), (13.5, 4.0), (14.0, 3.0), (15.0, 1.0),
                                              (17.0, 0.0)]
    assert pareto(SMALL, 1) == [solve(SMALL)]
    with pytest.raises(OhqError):
        pareto(SMALL, 0)


def random_problem(rng: np.random.Generator, n_layers: int, n_candidates: int) -> Problem:
    configs = [f"C{k}" for k in range(n_candidates)]
    options = {}
    for i in range(n_layers):
        ms = np.sort(rng.uniform(0.05, 2.0, n_candidates))[::-1]           # more bits: slower, less sensitive
        loss = np.sort(rng.exponential(1.0, n_candidates))
        keep = rng.random(n_candidates) > 0.1                              # some pairs unavailable
        keep[0] = True
        options[f"layer{i}"] = [Option(c, float(m), float(l), int(4096 * (n_candidates - k)))
                                for k, (c, m, l) in enumerate(zip(configs, ms, loss)) if keep[k]]
    return Problem(options, fixed_ms=3.0, ties=(("layer1", "layer2"), ("layer10", "layer11", "layer12")))


def test_100_layers_by_7_candidates_within_time():
    problem = random_problem(np.random.default_rng(0), 100, 7)
    size = 4096 * 7 * 70
    fastest, least_sensitive = pareto(problem, 2, size)
    times = []
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
        budget = fastest.ms + fraction * (least_sensitive.ms - fastest.ms)
        start = time.perf_counter()
        s = solve(problem, budget, size)
        times.append(time.perf_counter() - start)
        assert s.ms <= budget + 1e-6 and s.bytes <= size and s.config["layer1"] == s.config["layer2"]
        assert least_sensitive.loss <= s.loss <= fastest.loss
    print(f"100x7 solve seconds: {[round(t, 3) for t in times]}")
    assert max(times) < 2.0


def test_parse_budget():
    assert parse_budget("0.75", 20.0) == 15.0
    assert parse_budget("3", 20.0) == 60.0
    assert parse_budget("12.5ms", 20.0) == parse_budget(" 12.5 MS ", 1.0) == 12.5
    assert parse_budget("40ms", 20.0) == 40.0
    for bad, why in (("0", "positive"), ("-0.5", "positive"), ("-3ms", "positive"), ("0ms", "positive"),
                     ("12.5", "ambiguous"), ("fast", "not a number"), ("ms", "not a number"), ("nan", "not a number"),
                     ("1.2.3", "not a number"), ("", "not a number")):
        with pytest.raises(OhqError, match=why):
            parse_budget(bad, 20.0)


def test_fastest_checked_keeps_the_fastest_configuration_the_check_passes():
    """Ten layers whose low-bit candidates look harmless one by one, while the check (standing in for the
    whole-model loss) allows at most three of them together."""
    problem = Problem({f"l{i}": [Option("W8A8", 1.0, 0.01, 8), Option("W1A1", 0.6 - 0.01 * i, 0.02 + 0.01 * i, 1)]
                       for i in range(10)}, fixed_ms=2.0)
    int8 = {f"l{i}": "W8A8" for i in range(10)}
    calls = []

    def accept(config):
        calls.append(config)
        return sum(name == "W1A1" for name in config.values()) <= 3
    found = fastest_checked(problem, accept, int8, steps=7)
    assert len(calls) <= 8 and accept(found.config)
    assert sum(name == "W1A1" for name in found.config.values()) == 3      # as many as the check allows
    assert found == evaluate(problem, found.config) and found.ms < evaluate(problem, int8).ms
    assert fastest_checked(problem, lambda c: c == int8, int8).config == int8      # nothing passes: the fallback
    everything = fastest_checked(problem, lambda c: True, int8)
    assert set(everything.config.values()) == {"W1A1"}
    small = fastest_checked(problem, accept, int8, size_budget_bytes=70)     # INT8 (80 bytes) does not fit
    assert small.bytes <= 70 and accept(small.config)
    with pytest.raises(OhqError, match="size budget"):
        fastest_checked(problem, lambda c: c == int8, int8, size_budget_bytes=70)
    with pytest.raises(OhqError, match="infeasible"):
        fastest_checked(problem, accept, int8, size_budget_bytes=5)
