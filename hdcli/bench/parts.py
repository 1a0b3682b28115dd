"""Each part of a distillation step timed alone, on the benchmarked method's own modules (``hd bench distill``).

- ``mim_teacher``: the MIM teacher pass (blocks up to the last one entered, keep set, q·kᵀ on kept tokens)
  = a ``TeacherPass`` holding only the relations target;
- ``feat_teacher``: the feature teacher pass (all blocks, gather, per-token LayerNorm) = a ``TeacherPass``
  holding only the features target (its keep set is a random one of the same size);
- ``student``: the method's ``student_pass`` on a cached ``teacher_pass`` result, + backward;
- ``optimizer``: gradient clipping + AdamW (fused where available) + zero_grad, as the engine does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hdcli.bench.timing import TORCH_DTYPES, autocast, median_ms, sync

PARTS = ("mim_teacher", "feat_teacher", "student", "optimizer")


def _views(method):
    """One teacher pass per teacher over the hybrid's own teacher modules: the relations target's teacher (which
    also chooses the kept tokens) and the features target's teacher (on a random keep set of the same size)."""
    from hdcli.method.masking import Masking
    from hdcli.method.teacher import TeacherPass
    from hdcli.models import vit

    rel = _relations(method)
    feat = next(t for t in method.targets if t.kind == "features")
    m = method.masking
    common = dict(grid=method.grid, student_roles=vit.prefix_roles(method.student),
                  relation_heads=method.relation_heads)
    mim = TeacherPass({rel.teacher: method.teachers[rel.teacher]}, [rel], masking=m, mask_teacher=rel.teacher,
                      **common)
    feat_masking = Masking("random" if m.drops(method.num_patches) else "none", m.drop_ratio, m.blocks)
    feat = TeacherPass({feat.teacher: method.teachers[feat.teacher]}, [feat], masking=feat_masking, **common)
    return mim, feat


def _relations(method):
    return next(t for t in method.targets if t.kind == "relations")


class Parts:
    """Each part of a step timed alone on the benchmarked method's own modules (module docstring), plus
    optionally a plain timm forward over the MIM teacher's blocks (``timm_blocks``) and a large matmul
    (``gemm``). ``once()`` runs each of them one time; ``samples`` holds the seconds of each recorded run."""

    def __init__(self, method, images_u8: torch.Tensor, cfg, *, dtype: str, breakdown: bool = True,
                 reference: bool = False, reference_reps: int = 1, gemm_size: int | None = None):
        from hdcli.data import normalize
        from hdcli.train import optim

        self.method, self.cfg, self.dtype = method, cfg, dtype
        device = self.device = next(method.parameters()).device
        self.images = normalize(images_u8.to(device))
        self.amp = autocast(device, dtype)
        mim_view, feat_view = (v.to(device) for v in _views(method))
        self.fns: dict[str, Callable[[], None]] = {}
        if breakdown:
            oc = cfg.optim
            self.params = [p for p in method.parameters() if p.requires_grad]
            self.opt = optim.build_adamw(optim.param_groups_weight_decay(method, oc.weight_decay), oc,
                                         optim.scaled_lr(oc.blr, cfg.train.batch_size, oc.lr), device)
            self.clip = oc.clip_grad if oc.clip_grad else float("inf")
            with self.amp:
                self.cached = method.teacher_pass(self.images)
            self.fns["mim_teacher"] = lambda: self._teacher(mim_view)
            self.fns["feat_teacher"] = lambda: self._teacher(feat_view)
            self.fns["student"] = self._student
            self.fns["optimizer"] = self._optimizer
        self.pairs: dict[str, Callable[[], None]] = {}
        self.reference_reps = reference_reps
        if reference:
            name = _relations(method).teacher
            teacher = method.teachers[name]
            x = mim_view.teachers[name].prepare(self.images)
            last = self._last_block(method, mim_view)

            def plain():
                with torch.no_grad(), self.amp:
                    teacher.forward_intermediates(x, indices=[last], stop_early=True, intermediates_only=True,
                                                  output_fmt="NLC")

            self.pairs = {"ref_mim_teacher": lambda: self._teacher(mim_view), "timm_blocks": plain}
        if gemm_size is not None:
            n = gemm_size or (8192 if device.type == "cuda" else 2048)
            tdt = TORCH_DTYPES["fp32" if device.type == "cpu" and dtype == "fp16" else dtype]
            a, bm = (torch.randn(n, n, device=device, dtype=tdt) for _ in range(2))
            self.gemm_size, self.gemm_flops = n, 2 * n**3
            self.fns["gemm"] = lambda: a @ bm
        self.samples: dict[str, list[float]] = {k: [] for k in (*self.fns, *self.pairs)}

    @staticmethod
    def _last_block(method, mim_view) -> int:
        enter = set(_relations(method).blocks) | set(mim_view.mask_blocks)
        return max(enter) - 1  # blocks 0..max(enter)-1 run

    def _teacher(self, view) -> None:
        with self.amp:
            view(self.images)

    def _student(self) -> None:
        with self.amp:
            out = self.method.student_pass(self.images, self.cached)  # the hybrid's forward without its teachers
        out.loss.backward()

    def _optimizer(self) -> None:
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.found_inf = (~torch.isfinite(gn)).float()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def _run(self, k: str, fn: Callable[[], None], record: bool) -> None:
        sync(self.device)
        t = time.perf_counter()
        fn()
        sync(self.device)
        if record:
            self.samples[k].append(time.perf_counter() - t)

    def once(self, record: bool = True) -> None:
        """Each part once, then ``reference_reps`` (MIM part, plain timm) pairs in alternating order, then
        the matmul (``samples[k][j]`` of the pairs are neighbours in time)."""
        was_training = self.method.training
        self.method.train()
        for k, fn in self.fns.items():
            if k != "gemm":
                self._run(k, fn, record)
        for r in range(self.reference_reps if self.pairs else 0):
            for k, fn in (self.pairs.items() if r % 2 == 0 else reversed(self.pairs.items())):
                self._run(k, fn, record)
        if "gemm" in self.fns:
            self._run("gemm", self.fns["gemm"], record)
        self.method.train(was_training)
        if "optimizer" not in self.fns:
            for p in self.method.parameters():
                p.grad = None

    def medians_ms(self) -> dict[str, float]:
        return {k: median_ms(v) for k, v in self.samples.items() if v}
