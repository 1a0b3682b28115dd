"""Tools around trained models and runs: analysis (head distance, NMI, attention), export (timm, detectron2,
mmseg), the analytic FLOP model, and the benchmarks (step timing, per-part timing, device facts)."""
