"""The paper's Figures 1-3 (Sec. 2): which run makes each curve, where its analysis lies, and the drawing
(``hd report figures``; ``make reproduce-figures`` runs the chain, :mod:`hdcli.paper.reproduce`).

    Fig. 1  average head distance per block: (a) the pretrained teachers, (b) feature distillation of DeiT with no
            decoder, a linear one, 1 / 2 / 4 attention layers (and FD's student, Sec. 2.2), (c) the same with CLIP
    Fig. 2  NMI per block: (a) DeiT with the decoders of Fig. 1(b), (b) the encoder + a 4-layer decoder beside the
            DeiT teacher, (c) mask feature reconstruction against feature distillation (DeiT, CLIP)
    Fig. 3  average head distance per block: (a) encoder + decoder beside each teacher, (b) mask feature
            reconstruction against feature distillation

A run ``r`` (``recipes/paper/<r>.toml``) lives in ``<OUT>/<r>/`` as a table's run does (``distill/``), its analysis in
``<OUT>/<r>/analyze/{head_distance,nmi}.json`` (``hd analyze ... <OUT>/<r>/distill``: a decoder's blocks follow the
encoder's); the teachers' in ``<OUT>/teachers/analyze/``. Pure Python until :func:`draw` imports matplotlib.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hdcli.errors import HDError
from hdcli.rundir import atomic_write, read_json

TEACHERS = {"deit": "DeiT", "clip": "CLIP"}  # the feature teachers of Sec. 2 (registry names -> labels)
BASELINES = ("deit", "clip", "mae")  # Fig. 1(a): the pretrained models themselves
VARIANTS = {"none": "w/o decoder", "linear": "linear decoder", "dec1": "1 attention layer",
            "dec2": "2 attention layers", "dec4": "4 attention layers", "mfr": "mask feature reconstruction",
            "fd": "FD's student"}
METRICS = ("head_distance", "nmi")
TEACHER_RUN = "teachers"  # <OUT>/teachers/analyze/<metric>.json
ANALYZE = "analyze"
NAMES = ("figure1", "figure2", "figure3")


def run_name(teacher: str, variant: str) -> str:
    """The run (and recipe) of one curve: ``sec2-<teacher>-<variant>``."""
    return f"sec2-{teacher}-{variant}"


def runs() -> list[str]:
    """Every training run of the figures, teacher by teacher, in the order of :data:`VARIANTS`."""
    return [run_name(t, v) for t in TEACHERS for v in VARIANTS]


@dataclass(frozen=True)
class Curve:
    """One line of a panel: ``source`` = a run name or ``teacher:<name>``; ``decoder``: show a decoder's blocks after
    the encoder's (else the encoder's alone)."""

    source: str
    label: str
    decoder: bool = False


@dataclass(frozen=True)
class Panel:
    letter: str
    title: str
    curves: tuple[Curve, ...]


def _decoders(t: str, *, fd: bool = False) -> tuple[Curve, ...]:
    variants = ("none", "linear", "dec1", "dec2", "dec4") + (("fd",) if fd else ())
    return tuple(Curve(run_name(t, v), VARIANTS[v]) for v in variants)


def _reconstruction() -> tuple[Curve, ...]:
    return tuple(c for t, name in TEACHERS.items() for c in (Curve(run_name(t, "linear"), f"{name}: feature distillation"),
                                                            Curve(run_name(t, "mfr"), f"{name}: {VARIANTS['mfr']}")))


def _encoder_decoder(teachers) -> tuple[Curve, ...]:
    return tuple(c for t in teachers for c in (Curve(f"teacher:{t}", f"{TEACHERS[t]} teacher"),
                                               Curve(run_name(t, "dec4"), f"{TEACHERS[t]}: encoder + decoder", True)))


FIGURES: dict[str, tuple[str, str, tuple[Panel, ...]]] = {
    "figure1": ("head_distance", "Average head distance after feature distillation with various decoders", (
        Panel("a", "baselines", tuple(Curve(f"teacher:{t}", t.upper() if t == "mae" else TEACHERS[t]) for t in BASELINES)),
        Panel("b", "DeiT teacher", _decoders("deit", fd=True)),
        Panel("c", "CLIP teacher", _decoders("clip", fd=True)))),
    "figure2": ("nmi", "Normalized mutual information", (
        Panel("a", "various decoders (DeiT)", _decoders("deit")),
        Panel("b", "encoder and decoder", _encoder_decoder(("deit",))),
        Panel("c", "mask feature reconstruction", _reconstruction()))),
    "figure3": ("head_distance", "Average head distance", (
        Panel("a", "encoder and decoder", _encoder_decoder(tuple(TEACHERS))),
        Panel("b", "mask feature reconstruction", _reconstruction()))),
}


def analysis(out: Path, source: str, metric: str) -> Path:
    """Where ``hd analyze`` writes a curve's source's ``metric``."""
    run = TEACHER_RUN if source.startswith("teacher:") else source
    return Path(out) / run / ANALYZE / f"{metric}.json"


def read_curve(out: Path, curve: Curve, metric: str) -> dict | None:
    """The analysis entry of a curve (per_block, per_head, decoder_blocks), the encoder's blocks alone unless the
    curve shows its decoder; None when it has not been measured."""
    doc = read_json(analysis(out, curve.source, metric))
    if not doc or not isinstance(doc.get("models"), dict) or not doc["models"]:
        return None
    models = doc["models"]
    entry = models.get(curve.source.removeprefix("teacher:")) if curve.source.startswith("teacher:") else \
        next(iter(models.values()))
    if entry is None:
        return None
    k = int(entry.get("decoder_blocks") or 0)
    if k and not curve.decoder:
        entry = {**entry, "per_block": entry["per_block"][:-k], "per_head": entry["per_head"][:-k], "decoder_blocks": 0}
    return entry


def draw(out: str | os.PathLike, dest: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Figures 1-3 as PNGs in ``dest`` from the analyses under ``out``, laid out as the paper's (one panel per
    sub-figure, a line per curve: the mean over heads per block; a decoder's blocks shaded). Returns the files and
    the curves that are missing (drawn as absent and listed in the legend's title)."""
    from hdcli.ui import pyplot

    out, dest = Path(out), Path(dest)
    if not out.is_dir():
        raise HDError(f"no runs directory at {out}", "give the OUT of make reproduce-figures (--runs)")
    dest.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    written, missing = [], []
    for name, (metric, title, panels) in FIGURES.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), dpi=100, squeeze=False)
        for ax, panel in zip(axes[0], panels, strict=True):
            absent = []
            for curve in panel.curves:
                entry = read_curve(out, curve, metric)
                if entry is None:
                    absent.append(curve.label)
                    missing.append(f"{name}({panel.letter}) {curve.label} ({curve.source})")
                    continue
                y = entry["per_block"]
                k = int(entry.get("decoder_blocks") or 0)
                (line,) = ax.plot(range(len(y)), y, marker="o", markersize=3, linewidth=1.5, label=curve.label)
                if k:
                    ax.axvspan(len(y) - k - 0.5, len(y) - 0.5, color=line.get_color(), alpha=0.08)
            ax.set_title(f"({panel.letter}) {panel.title}", fontsize=10)
            ax.set_xlabel("block (shaded: decoder)" if any(c.decoder for c in panel.curves) else "block")
            ax.set_ylabel("average head distance (pixels)" if metric == "head_distance" else "NMI")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, loc="best", title=f"not run: {', '.join(absent)}" if absent else None,
                          title_fontsize=6)
            else:
                ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
        fig.suptitle(f"{name.replace('figure', 'Figure ')}: {title}", fontsize=11)
        fig.tight_layout()
        path = dest / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    lines = [f"# Figures 1-3 (paper Sec. 2) from {out}", "", *(f"![{p.stem}]({p.name})" for p in written), ""]
    if missing:
        lines += ["Not measured yet:", "", *(f"- {m}" for m in missing), ""]
    atomic_write(dest / "figures.md", "\n".join(lines))
    return written, missing
