"""The benchmarks' shared report writer: latest files, a chart, and a dated history."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.common import chart, machine, machine_tag, tables, write_report

REPORT = """# Speed, a test

## Forward

| run | forward (s) | ratio |
|---|---|---|
| unsharded | 0.500 | 1.00 |
| `tensor_parallel` | 0.450 | **0.90** |
| original | failed | |
"""


def test_tables_are_parsed_with_their_heading():
    (table,) = tables(REPORT)
    assert table["heading"] == "Forward"
    assert table["header"] == ["run", "forward (s)", "ratio"]
    assert [row[0] for row in table["rows"]] == ["unsharded", "`tensor_parallel`", "original"]


def test_report_writes_latest_files_a_chart_and_history(tmp_path):
    paths = write_report("speed", REPORT, data={"ratio": 0.9}, results=str(tmp_path), marks={"ratio": 1.0})
    assert sorted(os.listdir(tmp_path)) == ["history", "speed.json", "speed.md", "speed.png"]
    with open(paths["png"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    history = sorted(os.listdir(tmp_path / "history"))
    tag = machine_tag(machine())
    assert len(history) == 2 and all(f"-{tag}-speed." in name for name in history), history
    record = json.loads((tmp_path / "history" / history[0]).read_text())
    assert record["data"] == {"ratio": 0.9} and record["machine"]["cores"] == os.cpu_count()
    text = (tmp_path / "speed.md").read_text()
    assert text.startswith(REPORT) and "Machine:" in text and f"torch {record['machine']['torch']}" in text
    # a second run overwrites the latest files and keeps both in the history (one per minute)
    write_report("speed", REPORT.replace("0.450", "0.400"), results=str(tmp_path))
    assert "0.400" in (tmp_path / "speed.md").read_text()


def test_no_chart_without_a_numeric_table(tmp_path):
    assert not chart("# nothing\n\n| a | b |\n|---|---|\n| x | y |\n", str(tmp_path / "c.png"))
    assert not os.path.exists(tmp_path / "c.png")
    assert not chart(REPORT, str(tmp_path / "d.png"), columns=("memory",))  # no such column
    assert chart(REPORT, str(tmp_path / "e.png"), columns=("ratio",))


def test_gpu_report_gives_medians_and_paired_ratios():
    from benchmarks import gpu

    times = {gpu.ROWS[0]: (0.010, 0.320), gpu.ROWS[1]: (0.010, 0.064), gpu.ROWS[2]: (0.020, 0.640),
             gpu.ROWS[3]: (0.005, 0.160), gpu.ROWS[4]: (0.004, 0.096)}
    samples = {label: {"forward": [f, f * 2, f], "decode": [d, d * 2, d]} for label, (f, d) in times.items()}
    result = {"samples": samples, "same_tokens": dict.fromkeys(gpu.ROWS, True),
              "replays": {label: (160 if "cuda_graphs" in label else None) for label in gpu.ROWS}}
    text = gpu.report({"float32": result}, {"date": "2026-11-26", "devices": ["cuda:0", "cuda:0"], "rounds": 3},
                      "python -m benchmarks.run gpu")
    (table,) = tables(text)
    rows = {row[0]: row for row in table["rows"]}
    assert rows["tensor_parallel, 2 ranks, cuda_graphs"][1:] == ["5.00", "5.00", "2.00", "2.00", "True", "160"]
    assert rows["unsharded"][3:5] == ["1.00", "1.00"] and rows["tensor_parallel, 2 ranks"][6] == ""
    assert "one GPU: the ranks are threads on it" in text
    assert "**4.00x** as fast as eager and **2.00x** the unsharded" in text
    # a row that failed (torch.compile without a compiler, say) says why; the rest still report
    del samples[gpu.ROWS[1]]
    result.update(failed={gpu.ROWS[1]: "BackendCompilerFailed: no compiler"}, captures_while_timed={gpu.ROWS[3]: 1})
    text = gpu.report({"float32": result}, {"date": "2026-11-26", "devices": ["cuda:0", "cuda:1"], "rounds": 3}, "x")
    rows = {row[0]: row for row in tables(text)[0]["rows"]}
    assert rows[gpu.ROWS[1]][1] == "failed: BackendCompilerFailed: no compiler"
    assert rows[gpu.ROWS[3]][4] == "2.00" and "one GPU" not in text
    assert "Captures while timing (first-call costs inside the timed rounds): {'tensor_parallel, 2 ranks, cuda_graphs': 1}" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_gpu_benchmark_without_cuda_writes_nothing(tmp_path):
    from benchmarks import gpu

    assert gpu.main(["--results", str(tmp_path)]) == 0
    assert os.listdir(tmp_path) == []


def test_speed_report_has_the_call_cost_and_what_the_cores_give():
    from benchmarks import speed

    samples = {name: {"forward": [0.4, 0.5], "decode": [1.8, 2.0]} for name in ("unsharded", "tensor_parallel")}
    facts = {"layers": 8, "width": 1024, "floor": 2.0, "vocabulary_share": 0.39}
    result = {"samples": samples, "original": None, "rounds": 2, "memory": [337e6, 337e6], "unsharded_bytes": 673e6,
              "comm": {**facts, "calls": {"all_reduce": 16}, "bytes": 16 * 128 * 1024 * 4},
              "handoff": {2: 40.0}, "call_overhead": {"unsharded": 50.0, "2 devices": 250.0},
              "cores": {"compute: two threads / one": 1.2, "bandwidth: two threads / one": 1.6,
                        "small ops: two threads / one": 0.5}}
    by_heading = {t["heading"]: t for t in tables(speed.report({}, None, result, "python -m benchmarks.speed"))}
    assert by_heading["Cost of one call"]["rows"] == [["unsharded", "50.0"], ["2 devices", "250.0"]]
    assert by_heading["What this machine's two cores give"]["rows"][2] == ["small ops: two threads / one", "0.50"]


def _threads_of_a_new_thread() -> int:
    """torch's intra-op thread count in a thread started now (its default, which
    ``set_num_threads`` in any thread changes)."""
    import threading

    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


def test_core_and_call_probes_return_one_figure_each():
    from benchmarks import speed

    threads = torch.get_num_threads()
    gains = speed.cores(repeats=1)
    assert len(gains) == 4 and all(g > 0 for g in gains.values())
    assert _threads_of_a_new_thread() == threads  # the probes' one-thread setting did not stay
    costs = speed.call_overhead(calls=20, repeats=1)
    assert set(costs) == {"unsharded", "1 device", "2 devices"} and all(us > 0 for us in costs.values())


def test_a_probe_thread_that_fails_raises_in_the_caller():
    from benchmarks import speed

    def fails() -> float:
        raise ValueError("probe failed")
    with pytest.raises(ValueError, match="probe failed"):
        speed._concurrently([lambda: 1.0, fails])
