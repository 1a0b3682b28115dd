"""``hd bench data``: decode + augment throughput of a data source by decode path (docs/performance.md).

The paths (``hdcli.data.decode``) run interleaved, so all see the same machine load; the figures are medians
over rounds, and each path's speed-up is the median of its per-round ratios to the reference ``pil`` path.
"""

from __future__ import annotations

import statistics
import time

import torch

from hdcli.bench.timing import device_name, loadavg, sync
from hdcli.errors import HDError, did_you_mean

DATA_PATHS = ("pil", "cpu", "gpu")


def data(source: str | None, *, img_size: int = 224, batch_size: int = 64, workers: int | None = None,
         batches: int = 20, warmup: int = 2, split: str = "train", paths: tuple[str, ...] = DATA_PATHS,
         rounds: int = 3, step_rate: float | None = None, cpu: bool = False) -> dict:
    """Decode + augment throughput of ``source`` by each decode path (``hdcli.data.decode``: pil = the reference,
    cpu, gpu), through ``hdcli.data.build_loader`` with METHOD.md's training crop, uint8 out.

    The paths run interleaved: ``rounds`` rounds, each timing ``batches`` batches of every path (same machine
    load); figures are medians over rounds. Per path: ``images_per_s`` (what the loader hands over),
    ``per_core_images_per_s`` (over max(1, workers) cores: 0 workers decode in this process) and, for the gpu
    path, ``device_images_per_s`` (the batch decode on the device: CUDA, or this CPU with ``cpu``) and the
    samples it left to the CPU (``cpu_fallbacks``). ``step_rate`` (images/s a GPU trains): the cores each path
    needs to keep up. ``speedup`` is each path's per-core rate over the pil path's.
    """
    from hdcli import data as data_lib

    for what, v in (("--batch-size", batch_size), ("--batches", batches), ("--img-size", img_size),
                    ("--rounds", rounds)):
        if v < 1:
            raise HDError(f"{what} must be at least 1, got {v}")
    if warmup < 0:
        raise HDError(f"--warmup must be ≥ 0, got {warmup}")
    for p in paths:
        if p not in DATA_PATHS:
            raise HDError(f"unknown decode path {p!r}", did_you_mean(p, DATA_PATHS))
    workers = data_lib.default_num_workers() if workers is None else workers
    if workers < 0:
        raise HDError(f"--workers must be ≥ 0, got {workers}")
    device = torch.device("cuda") if torch.cuda.is_available() and not cpu else torch.device("cpu")
    need = warmup + rounds * batches
    iters, loaders = {}, {}
    for p in paths:
        loaders[p] = data_lib.build_loader(source, split=split, img_size=img_size, batch_size=batch_size, train=True,
                                           num_workers=workers, transform=data_lib.augment(img_size, decode=p),
                                           epoch_steps=need, pin_memory=device.type == "cuda")
        iters[p] = iter(loaders[p])
        for _ in range(warmup):  # worker start-up, first batches
            _next_batch(iters[p], source)
    loader_s: dict[str, list[float]] = {p: [] for p in paths}
    kept = []  # a few gpu-path batches, decoded on the device after the loader windows (workers would
    images = 0  # prefetch during a decode timed inside the window and flatter the loader)
    for _ in range(rounds):
        for p in paths:
            t, n = time.perf_counter(), 0
            for _ in range(batches):
                x, _y = _next_batch(iters[p], source)
                n += len(x)
                if p == "gpu" and len(kept) < 2:
                    kept.append(x)
            loader_s[p].append((time.perf_counter() - t) / n)
            images = n
    device_s = []
    for _ in range(rounds):
        for x in kept:
            sync(device)
            d = time.perf_counter()
            x.to(device)
            sync(device)
            device_s.append((time.perf_counter() - d) / len(x))
    cores = max(1, workers)
    out: dict = {"paths": {}, "workers": workers, "device": device_name(device)}
    for p in paths:
        per_image = statistics.median(loader_s[p])
        res = {"images_per_s": 1 / per_image, "per_core_images_per_s": 1 / per_image / cores,
               "samples_s": loader_s[p], "bad_samples": loaders[p].bad_samples}
        if p == "gpu":
            res["device_images_per_s"] = 1 / statistics.median(device_s)
            res["cpu_fallbacks"] = loaders[p].cpu_fallbacks
        if step_rate:
            res["cores_needed"] = step_rate / res["per_core_images_per_s"]
        out["paths"][p] = res
    if "pil" in paths:  # neighbouring windows, same load: the median of the per-round ratios
        for p in paths:
            out["paths"][p]["speedup"] = statistics.median(a / b for a, b in zip(loader_s["pil"], loader_s[p],
                                                                                   strict=True))
    for loader in loaders.values():
        loader.close()
    out["config"] = {"source": source or "demo", "split": split, "img_size": img_size, "batch_size": batch_size,
                     "batches": batches, "rounds": rounds, "warmup": warmup, "images_per_window": images,
                     "step_rate": step_rate, "threads": torch.get_num_threads(), "load": loadavg()}
    return out


def _next_batch(it, source):
    try:
        return next(it)
    except StopIteration:
        raise HDError(f"{source} gave fewer batches than timed", "lower --batches, --rounds or --batch-size") from None
