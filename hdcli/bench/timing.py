"""Device facts and timing primitives shared by the benchmarks: peaks, names, synchronised timers, a matmul
reference, peak memory, the machine's load."""

from __future__ import annotations

import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets. Matched against
# torch.cuda.get_device_name(), first hit wins (so the PCIe/NVL H100 variants come before plain "H100").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("RTX 4090", 165.0),
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by name (``PEAK_TFLOPS``), None when unknown (CPUs included)."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} CPU, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


def timed(fn: Callable[[], object], *, reps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def median_ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def measure_gemm(device: torch.device, dtype: str = "fp32", *, size: int | None = None, reps: int = 5) -> dict:
    """FLOP/s of a square ``size``² matmul in ``dtype`` (8192 on GPUs, 2048 on CPUs): the device's own
    attainable peak. Returns {"tflops" (median), "size", "ms"}."""
    size = size or (8192 if device.type == "cuda" else 2048)
    tdt = TORCH_DTYPES[dtype]
    if device.type == "cpu" and dtype == "fp16":
        tdt = torch.float32  # fp16 autocast does not exist on the CPU; the step runs fp32 there
    a = torch.randn(size, size, device=device, dtype=tdt)
    b = torch.randn(size, size, device=device, dtype=tdt)
    secs = timed(lambda: a @ b, reps=reps, warmup=1, device=device)
    s = statistics.median(secs)
    return {"tflops": 2 * size**3 / s / 1e12, "size": size, "ms": 1e3 * s}


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max memory allocated by tensors; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
