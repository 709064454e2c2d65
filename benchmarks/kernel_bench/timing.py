"""Timing, error capture and provenance shared by the benchmarks, on a GPU or (dry runs) on the CPU."""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def bench_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of fn() (triton.testing.do_bench: CUDA events, warm-up, many repeats)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def slow_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median milliseconds of a slow fn() over a few runs after one warm-up run (CUDA events)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


class Runner:
    """Timing and error capture on a GPU, or their CPU stand-ins in a dry run (device "cpu")."""

    def __init__(self, device: str) -> None:
        self.device, self.cuda = device, device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def fast_ms(self, fn: Callable[[], object], rep: int = 200) -> float:
        """Median ms of a fast fn: do_bench on a GPU, one timed call after a warm-up on the CPU."""
        return bench_ms(fn, warmup=25, rep=rep) if self.cuda else self.slow_ms(fn, repeats=1)

    def slow_ms(self, fn: Callable[[], object], repeats: int = 3) -> float:
        if self.cuda:
            return slow_ms(fn, repeats)
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]

    def wall_s(self, fn: Callable[[], object]) -> float:
        """Seconds of one call of fn, the device synchronised before and after."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def spread_ms(self, record: dict, key: str, fn: Callable[[], object], repeats: int = 5) -> None:
        """fast_ms of fn measured `repeats` times: record[key] the median of those medians and
        record[key + "_spread"] it with their min and max (how far one measurement moves from run to
        run); a failure is recorded as `attempt` records it."""

        def measure() -> dict[str, float]:
            times = sorted(self.fast_ms(fn) for _ in range(repeats))
            return {"median": times[len(times) // 2], "min": times[0], "max": times[-1]}

        spread = self.attempt(record, key + "_spread", measure)
        if spread is not None:
            record[key] = spread["median"]

    def attempt(self, record: dict, key: str, fn: Callable[[], object]):
        """record[key] = fn(); on failure record the error in record["errors"][key] and go on."""
        try:
            record[key] = fn()
        except Exception as exc:  # one failing case must not stop the run
            record.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}".strip()[:2000]
            print(f"  {key} failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            traceback.print_exc(limit=3)
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        return record.get(key)

    def median_of_3(self, row: dict, name: str, timed: Callable[[], float]) -> None:
        """row[name + "_tokens_per_s"]: the median of 3 runs of timed() after an untimed warm-up run."""
        self.attempt(row, f"{name}_warmup_tokens_per_s", timed)
        runs = [self.attempt(row, f"{name}_tokens_per_s", timed) for _ in range(3)]
        if all(r is not None for r in runs):
            row[f"{name}_tokens_per_s_runs"] = runs
            row[f"{name}_tokens_per_s"] = sorted(runs)[1]


def _shell(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except Exception as exc:
        return f"unavailable ({type(exc).__name__})"
    return done.stdout.strip() if done.returncode == 0 else f"unavailable ({done.stderr.strip()[:200]})"


def command_line() -> str:
    """The command that started this process, as typed: `python -m benchmarks.NAME ARGS` for a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name else [sys.argv[0]]
    return " ".join([Path(sys.executable).name, *head, *sys.argv[1:]])


SDPA_BACKENDS = (("flash", "flash"), ("cudnn", "cudnn"), ("efficient", "fmha"), ("efficient", "efficient"))


def sdpa_backend(fn: Callable[[], object], device: str) -> str:
    """Which kernel of scaled_dot_product_attention runs in fn(): "flash", "cudnn", "efficient" or
    "math" (none of those), read from the names of the CUDA kernels one call launches; "cpu" off a GPU."""
    if device != "cuda":
        return "cpu"
    from torch.profiler import ProfilerActivity, profile

    fn()  # compiled code compiles outside the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [event.key.lower() for event in prof.key_averages()]
    for backend, part in SDPA_BACKENDS:
        if any(part in name for name in names):
            return backend
    return "math"


def git_commit() -> str:
    """The commit of this tree; a copy of the tree without its .git names it in the variable GIT_COMMIT."""
    return os.environ.get("GIT_COMMIT") or _shell("git", "-C", str(ROOT), "rev-parse", "--verify", "HEAD")


PEER_PACKAGES = ("transformers", "fla-core", "flash-linear-attention")


def package_versions() -> dict[str, str | None]:
    """The installed version of each peer package the benchmarks compare with (None: not installed)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in PEER_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance() -> dict:
    """What ran where: GPU, clocks, driver, CUDA, library versions (the peers' too), date, the command,
    the commit."""
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "driver": _shell("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "sm_clock_max_mhz": _shell("nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
    }


def dry_provenance() -> dict:
    import triton

    return {
        "gpu": "none (dry run on the CPU: Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "command": command_line(),
    }


def results_path(name: str, prov: dict) -> Path:
    """benchmarks/results/<name>_<gpu>.json, the GPU's name in lower case with underscores."""
    gpu = re.sub(r"[^a-z0-9]+", "_", prov["gpu"].lower()).strip("_")
    return ROOT / "benchmarks" / "results" / f"{name}_{gpu}.json"


def measure_peaks(run: Runner) -> dict:
    """The two ceilings of the roofline, measured here: a bf16 matrix product and a device copy."""
    n, words = (8192, 2**28) if run.cuda else (256, 2**16)  # 1 GiB of float32 on a GPU
    a, b = (torch.randn(n, n, device=run.device, dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = run.fast_ms(lambda: a @ b)
    del a, b
    src = torch.randn(words, device=run.device)
    dst = torch.empty_like(src)
    copy_ms = run.fast_ms(lambda: dst.copy_(src))
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    del src, dst
    if run.cuda:
        torch.cuda.empty_cache()
    return {
        "bf16_matmul_tflops": 2 * n**3 / matmul_ms / 1e9,
        "matmul_shape": [n, n, n],
        "copy_gbps": nbytes / copy_ms / 1e6,
        "copy_bytes_read_plus_written": nbytes,
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if run.cuda else 1,
    }
