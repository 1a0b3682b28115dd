"""Watching a distillation while it trains: in-run k-NN evaluation of the student and its teachers (docs/distill.md).

- :mod:`~hdcli.watch.knn`: the weighted k-NN classifier of DINO's ``eval_knn.py`` (pure, on feature tensors);
- :mod:`~hdcli.watch.monitor`: the eval set, features of the student and teachers across ranks, the probe.

The per-target signals of a step are the method's (:mod:`hdcli.method.signals`); the plots of a run's
``metrics.jsonl`` are the loop's (:mod:`hdcli.train.plots`, ``hd plot``).
"""
