"""What every benchmark shares: results kept as files, timed runs that alternate between the
compared sides and are summarized by their median, and the check that compared answers vary.

    from _common import Checks, alternate, write_result

    runs = alternate({"naive": run_naive, "ours": run_ours}, repeat=3)
    checks = Checks()
    checks.require_varying("projection", answers)          # >= 3 distinct answers
    write_result("query", {"speedup": runs["naive"].median / runs["ours"].median},
                 headline={"speedup": ...}, targets={"speedup": ">= 2.0"})
    checks.exit_if_failed()

`write_result(name, payload)` writes `bench/results/<name>.json`: the payload plus the
machine (CPU model, cores, GPU if any), package versions, the git commit and the date, which
`bench/report.py` turns into the README's results table.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_DIR = Path(__file__).resolve().parents[1]
PACKAGES = (
    "llmudf",
    "torch",
    "transformers",
    "duckdb",
    "pyarrow",
    "pyspark",
    "triton",
    "llama-cpp-python",
)


# ---- results as files ----------------------------------------------------------------------


def write_result(
    name: str,
    payload: dict,
    *,
    headline: dict | None = None,
    targets: dict[str, str] | None = None,
    results_dir: Path | None = None,
) -> Path:
    """Writes `<results_dir>/<name>.json` (default bench/results/) and returns its path.

    headline: the numbers the README table shows, metric -> number or bool (default: every
    top-level number and bool of `payload`). targets: metric -> ">= 2.5", "<= 1", "== true";
    report.py marks each headline number met / not met.
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"result name must be letters, digits, '_' or '-', got {name!r}")
    if headline is None:
        headline = {k: v for k, v in payload.items() if isinstance(v, bool | int | float)}
    unknown = set(targets or ()) - set(headline)
    if unknown:
        raise ValueError(f"targets for metrics not in the headline: {sorted(unknown)}")
    record = {
        "name": name,
        "command": " ".join(["python", *_relative_argv()]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
        "headline": headline,
        "targets": dict(targets or {}),
        "result": payload,
    }
    folder = results_dir or RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    print(f"wrote {path}")
    return path


def machine() -> dict:
    """CPU model, cores, memory and GPU (None without CUDA) of this machine."""
    info = {
        "cpu": _cpu_model(),
        "num_cores": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "platform": platform.platform(),
        "gpu": None,
    }
    torch = sys.modules.get("torch")  # a benchmark that never loaded torch ran on no GPU
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict:
    """Python and the installed versions of the packages the benchmarks compare or use."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str:
    """HEAD's commit, with "-dirty" when tracked files differ from it ("unknown" outside git)."""
    try:
        head = _git("rev-parse", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


# ---- timing --------------------------------------------------------------------------------


@dataclass(slots=True)
class Runs:
    """The timed runs of one side: wall and CPU seconds of each, and what each returned."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    results: list = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median: how far the runs stray from each other."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median else 0.0

    def summary(self) -> dict:
        return {
            "median_s": round(self.median, 3),
            "runs_s": [round(s, 3) for s in self.seconds],
            "spread": round(self.spread, 3),
            "cpu_median_s": round(self.cpu_median, 3),
        }

    def describe(self) -> str:
        runs = " ".join(f"{s:.2f}" for s in self.seconds)
        return f"median {self.median:.2f} s (runs {runs}; spread {self.spread:.0%})"


def alternate(
    sides: dict[str, Callable[[], object]],
    repeat: int,
    prepare: Callable[[str], None] | None = None,
) -> dict[str, Runs]:
    """Runs every side `repeat` times, the sides alternating (a, b, a, b, ...), so that load
    from elsewhere on the machine hits them alike; `prepare(name)` runs untimed before each
    run (e.g. to empty a prefix cache)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    runs = {name: Runs() for name in sides}
    for _ in range(repeat):
        for name, run in sides.items():
            if prepare is not None:
                prepare(name)
            start, cpu_start = time.perf_counter(), time.process_time()
            result = run()
            runs[name].seconds.append(time.perf_counter() - start)
            runs[name].cpu_seconds.append(time.process_time() - cpu_start)
            runs[name].results.append(result)
    return runs


# ---- answers that vary ---------------------------------------------------------------------


def distinct_answers(answers: Iterable) -> int:
    """The number of distinct answers (text answers compared without surrounding blanks)."""
    return len({a.strip() if isinstance(a, str) else a for a in answers})


class Checks:
    """A benchmark's own checks: failures are collected, printed, and end the run with exit
    status 1 (after its result file is written, so a failed run is still on record)."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def require(self, condition: bool, message: str) -> bool:
        if not condition:
            self.failures.append(message)
        return condition

    def require_varying(self, label: str, answers: Iterable, minimum: int = 3) -> int:
        """Equal answers prove little when the model gives (nearly) the same answer to every
        row: `answers` must hold at least `minimum` distinct values. Returns their number."""
        num = distinct_answers(answers)
        self.require(
            num >= minimum,
            f"{label}: only {num} distinct answer(s), need >= {minimum} for 'identical' to "
            "mean anything; pick an instruction or fields on which the model's answers vary",
        )
        return num

    def exit_if_failed(self) -> None:
        if self.failures:
            for failure in self.failures:
                print(f"CHECK FAILED: {failure}", file=sys.stderr)
            raise SystemExit(1)


# ---- private helpers -------------------------------------------------------------------


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=True, timeout=30
    )
    return out.stdout.strip()


def _relative_argv() -> list[str]:
    script = Path(sys.argv[0]).resolve()
    try:
        first = str(script.relative_to(REPO_DIR))
    except ValueError:
        first = sys.argv[0]
    return [first, *sys.argv[1:]]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * page_size / 2**30, 1)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")
