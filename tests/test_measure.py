"""OQA: resumable tuning logs, the measure CLI, and measuring through an RPC tracker."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest
import tvm

from conftest import FMNIST, ROOT, copy_logs, run_cli
from ohq_tvm import kernels
from ohq_tvm.layers import Layer
from ohq_tvm.measure import Measurer, Record, TuningLog, candidates_for_bits, search, side_by_side
from ohq_tvm.target import parse_target

TARGET = parse_target("llvm")
LAYER = Layer("conv2d0", "conv2d", "conv", (1, 8, 8, 16), (16, 3, 3, 16), (1, 8, 8, 16), (1, 1), (1, 1, 1, 1))


@pytest.fixture
def measurers():
    """Makes Measurers whose build workers are stopped after the test: orphaned, they outlived pytest and
    slowed later 2-thread timings on this 2-core machine."""
    made = []

    def make(*args) -> Measurer:
        made.append(Measurer(*args))
        return made[-1]
    yield make
    for measurer in made:
        measurer.close()


def test_candidates_for_bits():
    names = [c.name for c in candidates_for_bits([8, 4, 2])]
    assert names == ["FP32", "W8A8", "W4A8", "W2A8", "W4A4", "W2A2"]
    assert len(candidates_for_bits([8, 4, 2, 1])) == len(kernels.CANDIDATES)


def test_search_logs_every_timing_and_resumes(tmp_path, measurers):
    path = tmp_path / "oqa.jsonl"
    measurer = measurers(TARGET)
    config = kernels.parse_config("W8A8")
    first = search(LAYER, config, measurer, TuningLog(path, TARGET))
    assert first.final and first.ms > 0 and measurer.measurements >= 1
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert sum(not l["final"] for l in lines) == measurer.measurements
    again = measurers(TARGET)
    assert search(LAYER, config, again, TuningLog(path, TARGET)) == first
    assert again.measurements == 0 and again.builds == 0


def test_a_hopeless_candidate_is_timed_once_not_refined(tmp_path, measurers):
    layer = Layer("conv2d0", "conv2d", "conv", (1, 8, 8, 32), (64, 3, 3, 32), (1, 8, 8, 64), (1, 1), (1, 1, 1, 1))
    config = kernels.parse_config("W2A2")
    assert len(kernels.knob_space(layer, config, kernels.isa_of(TARGET.tvm))) > 1
    measurer = measurers(TARGET)
    record = search(layer, config, measurer, TuningLog(tmp_path / "oqa.jsonl", TARGET), give_up_ms=1e-6)
    assert record.final and record.ms > 1e-6 and measurer.measurements == measurer.builds == 2   # timed, confirmed


def test_records_of_an_older_template_revision_are_measured_again(tmp_path, monkeypatch, measurers):
    path = tmp_path / "oqa.jsonl"
    config = kernels.parse_config("W1A1")
    first = search(LAYER, config, measurers(TARGET), TuningLog(path, TARGET))
    assert first.revision == kernels.REVISIONS["bitserial"]
    monkeypatch.setitem(kernels.REVISIONS, "bitserial", first.revision + 1)
    again = measurers(TARGET)
    second = search(LAYER, config, again, TuningLog(path, TARGET))
    assert again.measurements >= 1 and second.revision == first.revision + 1


def test_candidates_timed_in_different_runs_are_timed_again_side_by_side(tmp_path, measurers):
    path = tmp_path / "oqa.jsonl"
    configs = [kernels.parse_config(name) for name in ("W8A8", "W2A2")]
    first = search(LAYER, configs[0], measurers(TARGET), TuningLog(path, TARGET))
    second = search(LAYER, configs[1], measurers(TARGET), TuningLog(path, TARGET))
    assert first.run != second.run
    records = {"W8A8": first, "W2A2": second}
    measurer = measurers(TARGET)
    again = side_by_side(LAYER, records, None, measurer, TuningLog(path, TARGET))
    assert {r.run for r in again.values()} == {measurer.run} and measurer.builds == 2
    assert [(r.knobs, r.revision) for r in again.values()] == [(r.knobs, r.revision) for r in records.values()]
    log = TuningLog(path, TARGET)
    assert [search(LAYER, c, measurers(TARGET), log) for c in configs] == list(again.values())
    same = measurers(TARGET)
    assert side_by_side(LAYER, again, None, same, log) == again and same.builds == 0


def test_corrupt_log_lines_are_skipped_with_a_warning(tmp_path, measurers):
    path = tmp_path / "oqa.jsonl"
    search(LAYER, kernels.parse_config("W2A2"), measurers(TARGET), TuningLog(path, TARGET))
    good = path.read_text()
    path.write_text(good + '{"tvm": "0.27.0.post1", "targ\n' + "not json\n")
    with pytest.warns(UserWarning, match="corrupt tuning record"):
        log = TuningLog(path, TARGET)
    assert len(log.records) == len(good.splitlines())


def _copy_fp32_logs(work_dir):
    copy_logs(work_dir, TARGET, oqa=False)


def test_kill_and_resume_measures_nothing_twice(tmp_path):
    """kill -9 in the middle of `python -m ohq_tvm.measure`, rerun: every timing is logged once."""
    _copy_fp32_logs(tmp_path)
    cmd = [sys.executable, "-m", "ohq_tvm.measure", str(FMNIST), "--bits", "8,2", "--work-dir", str(tmp_path),
           "--tune-trials", "0"]
    log = tmp_path / TARGET.key / "oqa.jsonl"
    # its own process group, killed whole: the build and timing workers must not outlive the test (idle
    # orphans still slowed later 2-thread timings on this 2-core machine)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(log.read_text().splitlines())
    assert killed_at >= 8
    out = tmp_path / "m.json"
    result = subprocess.run(cmd + ["--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    records = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    # each setting timed once, the best of each search twice by design (its confirmation); one final per search
    # and run, the workload the kill split between runs timed again side by side in the second
    key = lambda r: (r["workload"], r["config"], tuple(r["knobs"] or ()))   # noqa: E731
    best = {key(r) for r in records if r["final"] and r["config"] != "FP32"}
    timed = Counter(key(r) for r in records if not r["final"])
    assert {k: v for k, v in timed.items() if v != (2 if k in best else 1)} == {}
    runs = {r["workload"]: set() for r in records}
    for r in records:
        runs[r["workload"]].add(r["run"])
    assert len(set().union(*runs.values())) == 2
    finals = Counter(key(r)[:2] for r in records if r["final"])
    assert {k: n for k, n in finals.items() if n != len(runs[k[0]])} == {}
    latest = {key(r)[:2]: r["run"] for r in records if r["final"]}
    assert all(latest[k] == max(runs[k[0]]) for k in latest)
    report = json.loads(out.read_text())
    assert len(report["layers"]) == 10
    assert all(set(layer["candidates"]) == {"FP32", "W8A8", "W2A8", "W2A2"} for layer in report["layers"])
    assert all(layer["candidates"]["W8A8"] > 0 for layer in report["layers"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_measure_through_rpc_tracker_on_localhost(tmp_path, measurers):
    port = _free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                                "--port", str(port), "--port-end", str(port + 1)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = None
    try:
        time.sleep(2)
        server = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}",
                                   "--key", "ohq-test", "--host", "127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(3)
        from ohq_tvm.measure import rpc_runner
        measurer = measurers(TARGET, rpc_runner(f"127.0.0.1:{port}", "ohq-test", 60))
        record = search(LAYER, kernels.parse_config("W8A8"), measurer, TuningLog(tmp_path / "rpc.jsonl", TARGET))
        assert record.final and record.ms is not None and record.ms > 0
        assert measurer.measurements >= 1
    finally:
        for proc in (server, tracker):     # with the server's session workers
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.parametrize("args, message", [
    (["--bits", "8,3"], "supported bit-widths"), (["--bits", "x"], "comma-separated"),
    (["--rpc-tracker", "127.0.0.1:9"], "go together"), (["--target", "aarch64"], "needs --rpc-tracker"),
])
def test_measure_cli_errors(args, message):
    result = run_cli("measure", FMNIST, *args)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_compacting_the_log_keeps_every_record_a_lookup_reaches(tmp_path):
    path = tmp_path / "oqa.jsonl"
    log = TuningLog(path, TARGET)

    def rec(config, knobs, ms, final=False, revision=1, run="a"):
        return Record(tvm=tvm.__version__, target=TARGET.key, workload="w", config=config, knobs=knobs, ms=ms,
                      final=final, revision=revision, run=run)
    rows = [rec("W8A8", [1, 4], 2.0), rec("W8A8", [2, 4], 1.5), rec("W8A8", [2, 4], 1.5, True),  # a search
            rec("W8A8", [2, 4], 1.6, True),                 # its best timed again in the same run: superseded
            rec("W8A8", [2, 4], 1.4, True, run="b"),        # ... in another run, side by side: the one looked up
            rec("W4A8", [1, 4], 1.0),                       # a search cut short: resumable
            rec("W8A8", [1, 4], 3.0, True, revision=2),     # a newer template's
            rec("FP32", [11], 5.0, True), rec("FP32", [12], 4.0, True), rec("FP32", [11], 4.5, True, run="b")]
    for r in rows:
        log.append(r)
    with open(path, "a") as f:
        f.write("not a record\n")
    assert log.compact() == 3 and log.compact() == 0
    assert path.read_text().splitlines()[-1] == "not a record"
    with pytest.warns(UserWarning, match="corrupt"):
        kept = TuningLog(path, TARGET)
    assert kept.records == [rows[i] for i in (3, 4, 5, 6, 7, 8, 9)]


def test_a_run_that_timed_every_candidate_is_reused_not_timed_again(tmp_path, measurers):
    """Two models share a workload but their FP32 kernels differ (a residual add's operands swapped): each
    schedule's run of side-by-side timings is found again instead of timing the candidates once more."""
    log = TuningLog(tmp_path / "oqa.jsonl", TARGET)

    def rec(config, knobs, ms, run):
        return Record(tvm=tvm.__version__, target=TARGET.key, workload="w", config=config, knobs=knobs, ms=ms,
                      final=True, revision=kernels.revision(LAYER, kernels.parse_config(config))
                      if config != "FP32" else 1, run=run)
    for r in (rec("FP32", [11], 5.0, "20261124T100000-1"), rec("W8A8", [2, 4], 1.5, "20261124T100000-1"),
              rec("FP32", [12], 4.0, "20261124T110000-2"), rec("W8A8", [2, 4], 1.4, "20261124T110000-2")):
        log.append(r)
    first_model = {"FP32": log.records[0], "W8A8": log.records[3]}     # its FP32 record, the last W8A8 one
    measurer = measurers(TARGET)
    again = side_by_side(LAYER, first_model, "an FP32 kernel, never built here", measurer, log)
    assert again == {"FP32": log.records[0], "W8A8": log.records[1]} and measurer.builds == 0
