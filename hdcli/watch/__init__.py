"""Watching a run while it trains: in-run k-NN evaluation, per-target signals, plots (docs/distill.md).

- :mod:`~hdcli.watch.knn`: the weighted k-NN classifier of DINO's ``eval_knn.py`` (pure, on feature tensors);
- :mod:`~hdcli.watch.signals`: per-target signals of a distillation step (pure, on tensors);
- :mod:`~hdcli.watch.monitor`: the eval set, features of the student and teachers across ranks, the probe;
- :mod:`~hdcli.watch.plot`: ``hd plot``: PNGs from ``metrics.jsonl``.
"""
