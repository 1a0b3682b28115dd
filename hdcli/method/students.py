"""Several students from one teacher pass: each teacher runs once per batch, every student learns from it.

    students = Students({"vit_s": distiller_s, "vit_b": distiller_b})   # Distillers over the same teachers
    outs = students(images)          # {"vit_s": DistillOutput, "vit_b": DistillOutput}
    sum(o.loss for o in outs.values()).backward()

The teachers' forwards (the expensive part: every image, every token, as far as any target needs) run once for
all students. From their hidden states each distinct teacher pass (students that share the targets, keep
settings and prefix tokens share one) draws its keep set and targets, and each student runs its own pass and
loss on them. A student differs from its neighbours in architecture, width, depth, its relation blocks, its
drop ratio; it shares the teachers, their blocks and the image grid (a different grid would need another
teacher pass: refused when built).

Exactness: each student sees what its own single-student run would: the random state its run would have is
restored before its teacher pass's keep set (random masking) and before its own pass (drop path), and the loss
of one student reaches none of the others' parameters, so on the CPU in fp32 each student's losses and gradients
equal its single run's bitwise (tests/test_students.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from hdcli.errors import HDError
from hdcli.method.distiller import Distiller, DistillOutput
from hdcli.method.teacher import TeacherPass


def shares_pass(a: TeacherPass, b: TeacherPass) -> bool:
    """Whether two teacher passes give the same targets from the same hidden states (one can serve both)."""
    def teacher_side(p: TeacherPass):
        targets = tuple((t.name, t.teacher, t.kind, t.blocks, t.norm, t.registers, t.pooled) for t in p.targets)
        return targets, p.masking, p.mask_teacher, p.relation_heads, tuple(sorted(p.tokens.items())), p.num_patches
    return teacher_side(a) == teacher_side(b) and a.teachers.keys() == b.teachers.keys() and all(
        a.model(n) is b.model(n) for n in a.teachers)


class Students(nn.Module):
    """Students distilled from one teacher pass. ``members``: name -> :class:`Distiller`, all over the same
    teacher models and image grid. Their distinct teacher passes are held in ``passes`` (registered once: their
    running target statistics are checkpointed once); each member holds its pass without registering it."""

    def __init__(self, members: Mapping[str, Distiller]):
        super().__init__()
        if not members:
            raise HDError("no students", "give one or more")
        first = next(iter(members.values()))
        passes: list[TeacherPass] = []
        for name, d in members.items():
            if d.img_size != first.img_size or d.grid != first.grid:
                raise HDError(f"student {name!r} sees a {d.grid[0]}x{d.grid[1]} grid of {d.img_size} px, the first "
                              f"{first.grid[0]}x{first.grid[1]} of {first.img_size}: one teacher pass cannot serve both",
                              "give the students one patch size (or train them in separate runs)")
            if any(d.teachers[n] is not first.teachers.get(n) for n in d.teachers) or d.teachers.keys() != first.teachers.keys():
                raise HDError(f"student {name!r} learns from other teachers than the first",
                              "several students share the teachers: give them one [distill] teachers list")
            tp = d.teacher_pass
            shared = next((p for p in passes if shares_pass(p, tp)), None)
            if shared is None:
                passes.append(tp)
                shared = tp
            if "teacher_pass" in d._modules:  # held by the students, not by each member
                del d._modules["teacher_pass"]
            object.__setattr__(d, "teacher_pass", shared)
        self.passes = nn.ModuleList(passes)
        self.members = nn.ModuleDict(dict(members))

    @property
    def teachers(self) -> dict[str, nn.Module]:
        return next(iter(self.members.values())).teachers

    def teacher_input(self, name: str, images: torch.Tensor) -> torch.Tensor:
        return next(iter(self.members.values())).teacher_input(name, images)

    def forward(self, images: torch.Tensor, detail: bool = False, only: str | None = None,
                cached=None) -> dict[str, DistillOutput]:
        """images [B, 3, H, W] -> {name: DistillOutput} of every member (``only``: one member, with just its own
        teacher pass: what its single-student run computes; ``cached``: the teacher pass read from a target
        cache, which serves students that share one teacher pass)."""
        members = {only: self.members[only]} if only is not None else dict(self.members)
        first = next(iter(members.values()))
        if tuple(images.shape[-2:]) != first.img_size:
            raise HDError(f"images are {tuple(images.shape[-2:])} px but the students expect {first.img_size}",
                          "resize the data to the students' img_size")
        passes = list(dict.fromkeys(d.teacher_pass for d in members.values()))  # in the members' order
        if cached is not None:
            if len(passes) > 1:
                raise HDError("a target cache holds one teacher pass, these students need several",
                              "give the students one drop ratio and one set of targets")
            targets, start, out = passes[0].normalise(cached), _rng_state(images.device), {}
            for name, d in members.items():
                _set_rng_state(images.device, start)
                out[name] = d.student_pass(images, targets, detail=detail)
            return out
        wanted: dict[str, list] = {}
        for p in passes:
            for teacher, w in p.wanted().items():
                wanted.setdefault(teacher, [])
                wanted[teacher] += [x for x in w if x not in wanted[teacher]]
        runs = passes[0].hidden(images, wanted)  # each teacher once, as far as any pass needs it
        start, targets, after = _rng_state(images.device), {}, {}
        for p in passes:  # random masking draws: each pass from the state its own run would have
            _set_rng_state(images.device, start)
            targets[id(p)] = p.from_hidden(runs, images)
            after[id(p)] = _rng_state(images.device)
        out = {}
        for name, d in members.items():
            _set_rng_state(images.device, after[id(d.teacher_pass)])  # drop path: what its own run would draw
            out[name] = d.student_pass(images, targets[id(d.teacher_pass)], detail=detail)
        return out


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
