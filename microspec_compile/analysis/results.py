"""The machine description and the CSV result files of the benchmarks and the demo.

Every row appended with :func:`append_rows` starts with the date and the machine
(CPU model, core count, torch and Python versions), so result files from different
machines and days can be mixed and filtered later.

Results go to ``bench/results/`` of the source tree unless ``$MICROSPEC_RESULTS_DIR``
names another folder (tests use that to keep the real result files clean).
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
from pathlib import Path

from ..cpu import SIMD_FLAGS, cpu_flags

__all__ = ["results_dir", "cpu_flags", "machine_info", "append_rows", "percentiles", "loadavg"]


def results_dir() -> Path:
    """Folder of the CSV result files (created on demand)."""
    default = Path(__file__).resolve().parents[2] / "bench" / "results"
    root = os.environ.get("MICROSPEC_RESULTS_DIR") or default
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _torch_version() -> str:
    torch = sys.modules.get("torch")  # avoid importing torch just for its version
    if torch is not None:
        return torch.__version__
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(detail: bool = False) -> dict:
    """Describe this machine and software stack.

    Parameters
    ----------
    detail : bool
        Add what a one-off report wants beyond the CSV stamp (the demo's JSON).

    Returns
    -------
    dict
        ``machine`` (CPU model from /proc/cpuinfo, else ``platform.processor()``),
        ``cpus`` (int, logical cores), ``torch`` (version str), ``python`` (version
        str) and ``platform`` (OS string). With ``detail``: also ``cpu_model`` (=
        ``machine``), ``torch_threads``, ``cpu_avx512`` (bool), ``cpu_flags`` (the
        :data:`SIMD_FLAGS` present), ``memory_gb``,
        ``load_average`` and ``transformers`` (version, when installed).
    """
    info = {
        "machine": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": _torch_version(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    if detail:
        info.update(_details(info["machine"]))
    return info


def _details(cpu_model: str) -> dict:
    import torch

    info = {"cpu_model": cpu_model, "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        flags = cpu_flags()
        info["cpu_avx512"] = "avx512f" in flags
        info["cpu_flags"] = " ".join(f for f in SIMD_FLAGS if f in flags)
        mem = next(line for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        info["memory_gb"] = round(int(mem.split()[1]) / 2**20, 1)
        info["load_average"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    return info


def append_rows(csv_name: str, rows: list[dict]) -> Path:
    """Append result rows to ``results_dir() / csv_name``.

    Each row is prefixed with ``date`` (ISO, seconds) and :func:`machine_info`
    columns unless it already has them. When rows bring columns the file does not
    have yet, the file is rewritten once with the union of the columns (old rows
    get empty cells), so the header always describes every row.

    Parameters
    ----------
    csv_name : str
        File name, e.g. ``"coverage.csv"``.
    rows : list of dict
        Column name -> value; values are written with ``str``.

    Returns
    -------
    Path
        The CSV file written.
    """
    path = results_dir() / csv_name
    stamp = {"date": datetime.datetime.now().isoformat(timespec="seconds"), **machine_info()}
    rows = [{**stamp, **row} for row in rows]
    old_rows: list[dict] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size > 0:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old_rows = list(reader)
    new_columns = [k for row in rows for k in row if k not in header]
    columns = header + list(dict.fromkeys(new_columns))
    if header and columns == header:
        with open(path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=columns).writerows(rows)
        return path
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old_rows + rows)
    os.replace(tmp, path)
    return path


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """``(p20, p50, p80)`` of timing samples (p50 is the median)."""
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    qs = statistics.quantiles(samples, n=10, method="inclusive")
    return qs[1], statistics.median(samples), qs[7]


def loadavg() -> str:
    """The 1/5/15-minute load averages, ``"a/b/c"`` (timings on a busy machine are suspect)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""
