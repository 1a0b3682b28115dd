"""``hd bench``: speed of the real training step and of the data path, measured as ratios in one run.

- :mod:`~hdcli.bench.timing`: clocks, device names and peaks, medians;
- :mod:`~hdcli.bench.parts`: each part of a distillation step timed alone on the method's own modules;
- :mod:`~hdcli.bench.steps`: the real engine on the real distill task, fed one batch, its steps timed;
- :mod:`~hdcli.bench.distill`: ``hd bench distill`` (images/s, TFLOP/s, MFU, parts, comparisons);
- :mod:`~hdcli.bench.data`: ``hd bench data`` (images/s of each decode path).
"""
