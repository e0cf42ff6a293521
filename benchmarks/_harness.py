"""The one small harness every benchmark script shares: fresh worker processes, rounds, medians, memory, tables.

* :func:`run_worker` runs a script again in a fresh subprocess (so each method's peak memory is its own) and reads
  back the JSON it wrote (:func:`write_worker_result` on the worker's side); :func:`round_robin` runs several such
  methods N times each, interleaved, so a machine that drifts slows all of them alike; :func:`pool_rounds` makes
  one row of the rounds (medians).
* :func:`interleaved` times several callables side by side in ONE process (one call of each in turn, rounds after
  a warm-up): the baseline and the method share every drift, so their ratio holds. :func:`timed` /
  :func:`median_time` time one callable; :func:`medians` and :func:`add_ratios` turn times into medians and
  ratios to a baseline.
* :class:`PeakMemory` measures peak RSS growth over a baseline (getrusage max-RSS and a 2 ms sampler).
* :func:`machine_info` / :func:`source_state` record where and on what code a result was measured.
* :func:`benchmark_parser` gives the scripts' common options (``--out``, ``--threads``, ``--rounds``, ...) the
  same spelling everywhere; :func:`write_report` writes ``<out>/<name>.json`` and ``.md`` and prints the tables.
* :func:`markdown_table` and the ``fmt_*`` helpers write the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _setup import REPO  # noqa: E402  (puts the checkout on sys.path, sets offline defaults)

import torch  # noqa: E402

MIB = 2**20
RESULTS = REPO / "benchmarks" / "results"  # where the scripts write by default (--out)


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak RSS growth over a baseline: exact via max-RSS once it exceeds the import-time peak, else sampled."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.baseline = current_rss()
        self.maxrss_at_start = max_rss()
        self.sampled = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.sampled = max(self.sampled, current_rss())
            time.sleep(self.interval)

    def growth(self) -> int:
        self.sampled = max(self.sampled, current_rss())
        peak = self.sampled
        if max_rss() > self.maxrss_at_start:
            peak = max(peak, max_rss())
        return peak - self.baseline

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.growth()


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``, one by one."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    """The median of :func:`timed` and all the times."""
    times = timed(fn, repeats)
    return statistics.median(times), times


def interleaved(arms: dict, rounds: int, repeats: int = 1, warmup: int = 1) -> dict[str, list[float]]:
    """Time several callables side by side in this one process: ``warmup`` untimed calls of each arm (arm by arm),
    then ``rounds`` rounds in which every arm in turn makes ``repeats`` timed calls. A machine whose speed drifts
    (other work, clock frequency) slows every arm alike, so ratios between the arms hold.

    Returns ``{arm: [seconds, ...]}`` (``rounds * repeats`` times each).
    """
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in arms}
    for _ in range(rounds):
        for name, fn in arms.items():
            times[name] += timed(fn, repeats)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """``{name: median of its times}``."""
    return {name: statistics.median(t) for name, t in times.items()}


def train_step(model, opt, batch: dict):
    """One training step: forward on ``batch`` (keyword inputs with labels), backward, optimizer step, gradients
    freed. Returns the loss."""
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def meminfo(key: str) -> int | None:
    """A line of /proc/meminfo in bytes (``"MemTotal"``, ``"MemAvailable"``), or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info[key].split()[0]) * 1024
    except (OSError, KeyError):
        return None


def machine_info() -> dict:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem_total, mem_available = meminfo("MemTotal"), meminfo("MemAvailable")
    import numpy
    import peft
    import transformers

    import hf_subspace

    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "mkl_num_threads_env": os.environ.get("MKL_NUM_THREADS"),
        "mem_total_gib": round(mem_total / 2**30, 1) if mem_total else None,
        "mem_available_gib": round(mem_available / 2**30, 1) if mem_available else None,
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "numpy": numpy.__version__,
        "hf_subspace": hf_subspace.__version__,
        "torch_parallel_backend": next(
            (line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
             if "parallel backend" in line), None),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "hf_subspace_source": source_state(),
    }


def sources_sha256() -> str:
    """A hash of the hf_subspace sources this run imports (each result records it: the tree may change mid-run)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "hf_subspace").rglob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def source_state() -> dict:
    """The git commit of the checkout and a hash of hf_subspace's sources (the working tree may be ahead of it)."""
    root = REPO / "hf_subspace"
    state = {"sources_sha256": sources_sha256()}
    try:
        state["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
        state["modified"] = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "."],
                                           capture_output=True, text=True, timeout=10).stdout.split("\n")
        state["modified"] = [line.strip() for line in state["modified"] if line.strip()]
    except (OSError, subprocess.SubprocessError):
        pass
    if not state.get("commit"):  # not a checkout (e.g. a frozen copy of one): the caller may say which commit
        state["commit"] = os.environ.get("HF_SUBSPACE_COMMIT", "unknown")
    return state


def run_worker(script: str | Path, args: list[str], timeout: float, threads: int | None = None) -> dict:
    """Run ``script`` in a fresh subprocess with ``args`` (plus ``--result-file F`` and ``--threads N``); returns
    the JSON it writes to ``F`` (or ``{"status": "failed", "reason": ...}``), with the load average around it."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, str(Path(script).resolve()), *args, "--result-file", result_file]
    if threads:
        cmd += ["--threads", str(threads)]
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    finally:
        load_after = os.getloadavg()[0]
    try:
        with open(result_file) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        tail = (proc.stderr or "").strip().splitlines()[-8:]
        why = " (killed: out of memory?)" if proc.returncode == -9 else ""
        result = {"status": "failed", "reason": f"worker exited with {proc.returncode}{why}: " + " | ".join(tail)}
    finally:
        if os.path.exists(result_file):
            os.unlink(result_file)
    result["load_average_1min"] = [round(load_before, 2), round(load_after, 2)]
    return result


def round_robin(jobs: dict[str, list[str]], script: str | Path, rounds: int, timeout: float,
                threads: int | None = None, progress=None) -> dict[str, list[dict]]:
    """Run every job (name -> worker arguments) ``rounds`` times, interleaved: round 1 of all, then round 2, ...

    Returns each job's list of results. ``progress(name, round, result)`` is called after each run.
    """
    out: dict[str, list[dict]] = {name: [] for name in jobs}
    for r in range(rounds):
        for name, args in jobs.items():
            result = run_worker(script, args, timeout, threads)
            out[name].append(result)
            if progress is not None:
                progress(name, r, result)
    return out


POOLED_MEDIANS = ("forward_s", "backward_s", "optimizer_s", "cpu_s", "peak_mem_mb", "mem_after_build_mb",
                  "step_matvec_s", "step_rmatvec_s", "projection_share", "matvec_s", "rmatvec_s", "build_s")


def pool_rounds(runs: list[dict], medians=POOLED_MEDIANS) -> dict:
    """One row from several rounds of the same method: step time is the median over all their timed steps,
    the other numbers the median of the rounds' values."""
    measured = [r for r in runs if r.get("status") == "measured"]
    row = dict(measured[-1])
    if len(measured) > 1:
        row["step_s_all"] = [t for r in measured for t in r["step_s_all"]]
        row["step_s"] = statistics.median(row["step_s_all"])
        for key in medians:
            if all(key in r for r in measured):
                row[key] = statistics.median(r[key] for r in measured)
        row["load_average_1min"] = [measured[0]["load_average_1min"][0], measured[-1]["load_average_1min"][-1]]
    row["rounds"] = [{"step_s": r["step_s"], "peak_mem_mb": r["peak_mem_mb"]} for r in measured]
    return row


def add_ratios(rows: dict, refs=("full", "lora"), keys=(("step_s", "time"), ("peak_mem_mb", "mem"),
                                                            ("cpu_s", "cpu")), name: str = "{what}_vs_{ref}") -> None:
    """Give every row ``<what>_vs_<ref>`` (``name``) = its ``key`` over the reference row's, for each reference
    present and measured (a row without a ``status`` counts as measured)."""
    for ref in refs:
        base = rows.get(ref)
        if not base or base.get("status", "measured") != "measured":
            continue
        for row in rows.values():
            for key, what in keys:
                if key in row and key in base:
                    row[name.format(what=what, ref=ref)] = row[key] / base[key]


def write_worker_result(path: str | Path, result: dict) -> None:
    """A worker's side of :func:`run_worker`: ``result`` plus the hash of the sources it ran (the tree may change
    during a run: each result says its code) as JSON to ``path``."""
    result["sources_sha256"] = sources_sha256()
    Path(path).write_text(json.dumps(result))


# -- command line and output --------------------------------------------------------------------------------------
_UNSET = object()


def benchmark_parser(doc: str, *, out: bool | str = False, threads=_UNSET, threads_help: str | None = None, rounds=_UNSET,
                     rounds_help: str | None = None, timeout=_UNSET, worker: bool = False,
                     formatter_class=argparse.HelpFormatter) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the options the scripts share: ``--out`` (the output folder; ``out=True``: default
    :data:`RESULTS`, a string: that default), and each of ``--threads`` (torch threads), ``--rounds`` and
    ``--timeout`` (seconds per worker subprocess) when its default is given (``None`` is a default), and with
    ``worker=True`` the hidden ``--result-file`` of :func:`run_worker`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=formatter_class)
    if out:
        p.add_argument("--out", default=str(RESULTS) if out is True else out, help="output folder")
    if threads is not _UNSET:
        p.add_argument("--threads", type=int, default=threads, help=threads_help or "torch threads")
    if rounds is not _UNSET:
        p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    if timeout is not _UNSET:
        p.add_argument("--timeout", type=float, default=timeout, help="seconds per worker subprocess")
    if worker:
        p.add_argument("--result-file", help=argparse.SUPPRESS)
    return p


def read_results(path: str | Path) -> dict:
    """The JSON results an earlier run wrote to ``path`` (``{}`` if there are none)."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_report(out: str | Path, name: str, results: dict, markdown: str, echo: bool = True) -> None:
    """``<out>/<name>.json`` (``results``, indented by 1) and ``<out>/<name>.md`` (``markdown``); prints the
    markdown with ``echo``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown)
    if echo:
        print(markdown)


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """A markdown table; ``align`` is one character per column (``l`` or ``r``; default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return lines


def fmt_s(x, digits=3):
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}" if x >= 0.001 else f"{x * 1e3:.3f} ms"


def fmt_mb(x):
    return "—" if x is None else (f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB")


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}×"


def fmt_int(x):
    return "—" if x is None else f"{x:,}"


def fmt_bytes(x, spec: str = ".1f"):
    """Decimal units (GB, MB, KB; bytes below), the number formatted with ``spec``."""
    if x is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= size:
            return f"{x / size:{spec}} {unit}"
    return f"{x} B"
