"""The benchmarks' shared harness (benchmarks/_harness.py, _models.py), their reports, and smoke runs of the scripts
in their quickest modes (in this process, tiny sizes: seconds, not the benchmarks' minutes)."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_interleaved_warms_each_arm_then_alternates_the_timed_calls():
    log = []
    arms = {name: (lambda name=name: log.append(name)) for name in ("base", "method")}
    times = _harness.interleaved(arms, rounds=2, repeats=3, warmup=2)
    assert log == ["base"] * 2 + ["method"] * 2 + (["base"] * 3 + ["method"] * 3) * 2
    assert {k: len(v) for k, v in times.items()} == {"base": 6, "method": 6}
    assert all(t >= 0 for v in times.values() for t in v)
    log.clear()
    _harness.interleaved(arms, rounds=2)  # bench_memory's timing: one warm-up step each, then one step each in turn
    assert log == ["base", "method"] * 3


def test_medians_ratios_and_formats():
    assert _harness.medians({"a": [3.0, 1.0, 2.0]}) == {"a": 2.0}
    rows = {"full": {"step_s": 2.0}, "lora": {"step_s": 1.0}, "x": {"step_s": 4.0}}
    _harness.add_ratios(rows, keys=(("step_s", "x"),), name="{what}_{ref}")  # rows without status: measured
    assert rows["x"] == {"step_s": 4.0, "x_full": 2.0, "x_lora": 4.0}
    rows = {"full": {"status": "failed", "step_s": 1.0}, "m": {"status": "measured", "step_s": 2.0}}
    _harness.add_ratios(rows, refs=("full",))
    assert "time_vs_full" not in rows["m"]
    assert _harness.fmt_bytes(26_953_662_464) == "27.0 GB"
    assert _harness.fmt_bytes(26_953_662_464, ".3g") == "27 GB"
    assert _harness.fmt_bytes(512) == "512 B" and _harness.fmt_bytes(None) == "—"
    assert _harness.markdown_table(["a", "b"], [[1, "x"]], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |"]


def test_parser_and_report_files(tmp_path, capsys):
    p = _harness.benchmark_parser("doc", out=True, threads=1, rounds=2, timeout=9.0, worker=True)
    args = p.parse_args([])
    assert (args.out, args.threads, args.rounds, args.timeout, args.result_file) == (
        str(_harness.RESULTS), 1, 2, 9.0, None)
    assert not hasattr(_harness.benchmark_parser("doc").parse_args([]), "out")
    assert _harness.read_results(tmp_path / "x.json") == {}
    _harness.write_report(tmp_path / "out", "x", {"a": 1}, "# x\n")
    assert _harness.read_results(tmp_path / "out" / "x.json") == {"a": 1}
    assert (tmp_path / "out" / "x.md").read_text() == "# x\n" and "# x" in capsys.readouterr().out
    _harness.write_worker_result(tmp_path / "w.json", {"status": "measured"})
    assert json.loads((tmp_path / "w.json").read_text())["sources_sha256"] == _harness.sources_sha256()


def table_headers(markdown: str) -> list[str]:
    """The header row of every table (the line above a |---| separator)."""
    lines = markdown.splitlines()
    return [a for a, b in zip(lines, lines[1:]) if re.match(r"^\|(-+:?\|)+$", b)]


def reports():
    import bench_comm
    import bench_engine
    import bench_inference
    import bench_memory
    import bench_speed
    import bench_twa

    def load(name):
        return json.loads((RESULTS / name).read_text())

    comm = load("comm.json")
    return {
        "speed.md": bench_speed.markdown_report(load("speed.json")),
        "memory.md": bench_memory.markdown_report(load("memory.json")),
        "quantized/memory.md": bench_memory.markdown_report(load("quantized/memory.json")),
        "comm.md": bench_comm.markdown_report(comm["results"], comm["steps"]),
        "engine.md": bench_engine.markdown(load("engine.json")),
        "inference.md": bench_inference.markdown_report(load("inference.json")),
        **{f"{n}.md": bench_twa.markdown_report(load(f"{n}.json")) for n in ("twa", "twa_adamw", "twa_pca")},
    }


def test_reports_from_the_committed_results_have_the_committed_tables():
    """Each script rewrites its report from its results JSON with the tables (columns) of the committed report (which
    may hold more: notes of earlier sessions added by hand)."""
    for name, text in reports().items():
        committed = iter(table_headers((RESULTS / name).read_text()))
        assert all(header in committed for header in table_headers(text)), name  # in order


def test_bench_inference_quick(tmp_path, keep_threads):
    import bench_inference

    report = bench_inference.main(["--quick", "--threads", "1", "--out", str(tmp_path)])
    for task in ("minilm_eval_forward", "gpt2_generate"):
        assert set(report[task]) == {"plain", "adapter, cached", "adapter, uncached"}
        assert report[task]["plain"]["x_plain"] == 1.0
    assert not list(tmp_path.iterdir())  # --quick writes nothing


def test_bench_engine_tiny_counts(tmp_path, keep_threads):
    import bench_engine

    bench_engine.main(["--models", "gpt2", "--no-7b", "--no-time", "--out", str(tmp_path)])
    counts = json.loads((tmp_path / "engine.json").read_text())["counts_tiny"]
    assert set(counts) == {f"gpt2/{method}" for method, _ in bench_engine.METHODS}
    assert all(c["host_reads"] == 0 and c["data_dependent"] == 0 for c in counts.values())
    assert table_headers((tmp_path / "engine.md").read_text()) == [
        "| method | gpt2: ops (x full) / syncs / data-dep. |"]


def test_bench_speed_projection_worker():
    import bench_speed

    row = bench_speed.measure_projection("hashing", 10_000, 100, repeats=1)
    assert row["status"] == "measured" and row["matvec_s"] > 0 and row["state_mb"] > 0


def test_bench_twa_tiny(tmp_path, keep_threads):
    import bench_twa

    report = bench_twa.main(["--epochs", "1", "--train-size", "512", "--val-size", "128", "--test-size", "128",
                             "--seeds", "0", "--snapshots", "4", "--twa-lr", "1", "--no-short-sgd", "--threads", "1",
                             "--out", str(tmp_path)])
    assert set(report["summary"]) == {"sgd", "twa", "swa", "half"}
    assert report["per_seed"]["0"]["same_trajectory_check"]["identical"]
    assert table_headers((tmp_path / "twa.md").read_text()) == table_headers((RESULTS / "twa.md").read_text())[:1]


def test_bench_memory_worker_and_interleaved_timing_on_a_tiny_gpt2(monkeypatch):
    """bench_memory's per-process measurement and its one-process side-by-side timing (what bench_engine's step-time
    ratios also use), with a 2-layer GPT-2 in place of GPT-2 124M."""
    import _models
    import bench_memory

    monkeypatch.setitem(bench_memory.MODELS, "gpt2", {**bench_memory.MODELS["gpt2"], "batch": 2, "seq": 8})
    monkeypatch.setattr(bench_memory, "build_model", lambda name: _models.gpt2(vocab_size=97, n_embd=32, n_layer=2,
                                                                               n_head=2, n_positions=32))
    row = bench_memory.measure("gpt2", "global1k")
    assert row["status"] == "measured" and len(row["step_s_all"]) == bench_memory.STEPS
    assert row["trainable"] == 1_000 and row["projection_state_bytes"] > 0
    times = bench_memory.time_interleaved("gpt2", ["full", "lora", "global1k"], rounds=2)
    assert {k: len(v) for k, v in times.items()} == {"full": 2, "lora": 2, "global1k": 2}


def test_readme_and_docs_benchmark_commands_parse():
    """Every ``python benchmarks/<script>.py ...`` command in the README and the docs is accepted by that script's
    options."""
    import importlib
    import shlex

    readme = "\n".join(p.read_text() for p in [BENCH.parent / "README.md", *sorted((BENCH.parent / "docs").glob("*.md"))])
    commands = re.findall(r"python benchmarks/(\w+)\.py([^`#\n]*)", readme)
    commands += re.findall(r"`python\s+benchmarks/(bench_comm)\.py( --only[^`]*)`", readme)  # across a line break
    assert len(commands) >= 10 and "bench_comm" in {c[0] for c in commands}
    for script, rest in commands:
        module = importlib.import_module(script)
        module.parse_args(shlex.split(rest.replace("\\", "")))
