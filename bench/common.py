"""Helpers shared by the benchmark sections: timing, machine facts, peak FLOP/s, memory, data."""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class MissingData(RuntimeError):
    """A real dataset the benchmark wants is not on this machine."""


# --------------------------------------------------------------------------- timing


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall seconds of ``repeats`` calls and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


# --------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy as np
    import scipy
    import sklearn
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "isa": sorted(f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"}),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.is_available(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "load_average_at_start": load_average(),
        "cpu_kind": cpu_kind(),
    }


def cpu_kind() -> dict[str, Any]:
    """Which kind of CPU this is for mosaic: the same detection ``dtype: auto`` uses (``cpu_has_bf16``)."""
    from mosaic_dag.lm.models import cpu_has_bf16, dtype_name, resolve_dtype

    native = cpu_has_bf16()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    label = "native bf16 (AVX-512 BF16 / AMX)" if native else "no native bf16"
    if isa:
        label += f", oneDNN capped at {isa}"
    return {"native_bf16": native, "auto_dtype": dtype_name(resolve_dtype("auto", "cpu")), "onednn_max_cpu_isa": isa,
            "label": label}


def setup_threads(threads: int | None) -> int:
    """torch intra-op threads = the usable cores unless told otherwise; returns the count used."""
    import torch

    n = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def _onednn_linear(m: int, k: int, n: int, dtype: Any) -> Callable[[], Any] | None:
    """The same product through oneDNN directly (``mkldnn_linear``), or None where torch lacks it."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return None
    x = torch.randn(m, k).to(dtype).to_mkldnn()
    w = torch.randn(n, k).to(dtype).to_mkldnn()
    try:
        torch._C._nn.mkldnn_linear(x, w, None)
    except (RuntimeError, AttributeError):
        return None
    return lambda: torch._C._nn.mkldnn_linear(x, w, None)


def _torch_matmul(m: int, k: int, n: int, dtype: Any) -> Callable[[], Any]:
    """[m, k] @ [k, n] through ``torch.matmul`` into a preallocated output."""
    import torch

    a, b, c = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype), torch.empty(m, n, dtype=dtype)
    return lambda: torch.matmul(a, b, out=c)


def _gflops(fn: Callable[[], Any], flops: float, repeats: int) -> float:
    """Best GFLOP/s of ``repeats`` timed calls after one untimed warm-up (kernel selection, page faults)."""
    fn()
    times, _ = timed(fn, repeats)
    return flops / min(times) / 1e9


SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (4096, 640, 2048), (4096, 2048, 640))


def peak_matmul_gflops(repeats: int = 5, max_dim: int = 4096) -> dict[str, Any]:
    """Measured matmul roofline per dtype: the best GFLOP/s of ``repeats`` runs over shapes and libraries.

    Shapes: square 1024/2048/4096 and the Gemma 3 270M MLP shapes at 4096 rows, each through
    ``torch.matmul`` and through oneDNN directly (on the AMD CPU we measured, oneDNN's float32 product
    was up to ~1.4x faster than torch.matmul's; leaving it out would understate the fp32 roofline). The best
    (not the median) run is the roofline: what this machine demonstrably reaches, so fractions of it
    are conservative. Contention from other processes can only lower it. ``max_dim`` leaves out the
    bigger shapes: a quicker, lower roofline, for smoke runs.
    """
    import torch

    shapes = [s for s in SHAPES if max(s) <= max_dim] or [min(SHAPES, key=max)]
    out: dict[str, Any] = {}
    with torch.inference_mode():
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            best, per_shape = 0.0, {}
            for m, k, n in shapes:
                runs = {"torch": _torch_matmul(m, k, n, dtype)}
                onednn = _onednn_linear(m, k, n, dtype)
                if onednn is not None:
                    runs["onednn"] = onednn
                for lib, fn in runs.items():
                    gf = _gflops(fn, 2 * m * k * n, repeats)
                    per_shape[f"{m}x{k}x{n} {lib}"] = round(gf, 1)
                    best = max(best, gf)
            out[name] = {"gflops": round(best, 1), "by_shape": per_shape}
    return out


def spot_peak(peak: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """The best shape and library of each dtype in ``peak``, measured again now (~1 s).

    Taken right before each timed run, so each run's share of the roofline can be paired with the
    machine's speed at that moment: this machine's speed drifts by up to ~25% within minutes.
    """
    import torch

    out: dict[str, Any] = {}
    with torch.inference_mode():
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            shape, lib = max(peak[name]["by_shape"].items(), key=lambda kv: kv[1])[0].split()
            m, k, n = (int(x) for x in shape.split("x"))
            fn = (_onednn_linear(m, k, n, dtype) if lib == "onednn" else None) or _torch_matmul(m, k, n, dtype)
            gflops = round(_gflops(fn, 2 * m * k * n, repeats), 1)
            out[name] = {"gflops": gflops, "by_shape": {f"{shape} {lib}": gflops}}
    return out


def merge_peaks(*peaks: dict[str, Any]) -> dict[str, Any]:
    """Best of several roofline measurements (taken at different moments of the run)."""
    out: dict[str, Any] = {}
    for name in ("float32", "bfloat16"):
        best = max(peaks, key=lambda p: p[name]["gflops"])
        out[name] = {"gflops": best[name]["gflops"], "measurements": [p[name]["gflops"] for p in peaks],
                     "by_shape": best[name]["by_shape"]}
    return out


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM).

    Not ``getrusage().ru_maxrss``: on Linux that survives ``execve``, so a subprocess started by a
    big parent reports the parent's peak (measured here: both memory children reported the parent's
    3.1 GB). VmHWM belongs to the process's own address space. ``ru_maxrss`` is the fallback off Linux.
    """
    try:
        return _status_kib("VmHWM") / 1024
    except OSError:  # pragma: no cover - non-Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    try:
        return _status_kib("VmRSS") / 1024
    except OSError:  # pragma: no cover - non-Linux
        return float("nan")


# --------------------------------------------------------------------------- densify guard


def _caller_outside_scipy() -> str:
    """file:line (function) of the innermost frame outside scipy.sparse: who asked for the densification."""
    import traceback

    for frame in reversed(traceback.extract_stack()[:-2]):
        if "scipy/sparse" not in frame.filename:
            return f"{'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno} ({frame.name})"
    return "?"


@contextmanager
def count_densify(min_elements: int = 1 << 20) -> Iterator[dict[str, Any]]:
    """Count ``toarray``/``todense`` calls on scipy sparse objects with at least ``min_elements`` cells."""
    import scipy.sparse as sp

    counter: dict[str, Any] = {"calls": 0, "big_calls": 0, "big_vectors": 0, "where": {}}
    classes = {type(x) for x in (sp.csr_matrix((1, 1)), sp.csc_matrix((1, 1)), sp.coo_matrix((1, 1)),
                                 sp.csr_array((1, 1)), sp.csc_array((1, 1)), sp.coo_array((1, 1)))}
    owners: dict[tuple[type, str], Any] = {}
    for cls in classes:
        for klass in cls.__mro__:
            for name in ("toarray", "todense"):
                if name in vars(klass) and (klass, name) not in owners:
                    owners[(klass, name)] = vars(klass)[name]

    depth = [0]  # todense() calls toarray(): count the outermost call only

    def wrap(orig: Any) -> Any:
        def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                counter["calls"] += 1
                if self.shape[0] * self.shape[1] >= min_elements:
                    counter["big_calls"] += 1
                    counter["big_vectors"] += int(min(self.shape) == 1)  # one row or column of width size
                    site = _caller_outside_scipy()
                    counter["where"][site] = counter["where"].get(site, 0) + 1
            depth[0] += 1
            try:
                return orig(self, *args, **kwargs)
            finally:
                depth[0] -= 1

        return guarded

    for (klass, name), orig in owners.items():
        setattr(klass, name, wrap(orig))
    try:
        yield counter
    finally:
        for (klass, name), orig in owners.items():
            setattr(klass, name, orig)


# --------------------------------------------------------------------------- data


def jailbreak_prompts(n: int, data_dir: Path = SHARED_DATA) -> list[str]:
    """First ``n`` prompts of the jailbreak-classification train file (real, long-ish English prompts)."""
    f = data_dir / "jailbreak_classification" / "balanced" / "jailbreak_dataset_train_balanced.csv"
    if not f.is_file():
        raise MissingData(f"{f} is absent: the throughput benchmark needs the shared real-text data (../shared/data)")
    with open(f, newline="", encoding="utf-8") as fh:
        texts = [row["prompt"] for row in csv.DictReader(fh) if row.get("prompt")]
    if len(texts) < n:
        raise MissingData(f"{f} has {len(texts)} prompts, {n} wanted")
    return texts[:n]


def tweets(n: int, data_dir: Path = SHARED_DATA) -> list[str]:
    """``n`` short real texts: the train tweets of every language of tweet_sentiment_multilingual, in turn."""
    root = data_dir / "tweet_sentiment_multilingual"
    files = sorted(root.glob("*/train_text.txt"))
    if not files:
        raise MissingData(f"{root} is absent: the memory benchmark needs the shared real-text data (../shared/data)")
    per_lang = [[t for t in f.read_text(encoding="utf-8").splitlines() if t.strip()] for f in files]
    out: list[str] = []
    i = 0
    while len(out) < n and any(i < len(x) for x in per_lang):
        out.extend(x[i] for x in per_lang if i < len(x))
        i += 1
    if len(out) < n:
        raise MissingData(f"{root} has {len(out)} train tweets, {n} wanted")
    return out[:n]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
