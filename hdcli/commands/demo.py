"""``hd demo``: pre-train two tiny teachers, hybrid-distil a student, probe/fine-tune/analyse all three,
write ``<out>/report.md`` and print its table (hdcli/paper/demo.py). ``make demo`` runs it.
``hd demo --study``: the mini study on Fashion-MNIST (hdcli/paper/study.py, docs/mini-study.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

STUDY = "Mini study (--study)"


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory: one run dir per stage, "
                                                 "analysis/, report.md (default: runs/demo; --study: "
                                                 "runs/mini-study).", show_default=False)] = None,
        quick: Annotated[bool, typer.Option("--quick", help="A few steps per stage (CI smoke test, about a "
                                            "minute); the numbers are meaningless.")] = False,
        force: Annotated[bool, typer.Option("--force", help="Redo every stage, also those finished "
                                            "before.")] = False,
        seed: Annotated[int, typer.Option("--seed", help="Seed of every stage (demo).")] = 0,
        study: Annotated[bool, typer.Option("--study", help="Run the mini study instead: the comparison rows "
                                            "of the paper's Tab. 1/3 on Fashion-MNIST over seeds (about 25 min on 2 cores).",
                                            rich_help_panel=STUDY)] = False,
        seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds of the study rows.",
                                           rich_help_panel=STUDY)] = "0,1,2",
        rows: Annotated[str | None, typer.Option("--rows", help="Comma-separated study rows (default: all: "
                                                 "distill-mae, distill-sup, sup-own-rel, hybrid, hybrid-keep34, "
                                                 "hybrid-keep73).", rich_help_panel=STUDY, show_default=False)] = None,
        data: Annotated[str | None, typer.Option("--data", help="Study data: fashion-mnist[:DIR] (default) or demo.",
                                                 rich_help_panel=STUDY, show_default=False)] = None,
    ) -> None:
        """The method end to end on the built-in digits, in under 10 minutes on 2 CPU cores, offline.

        Stages: pre-train a tiny MAE and a tiny supervised teacher; hybrid-distil a student from them
        with progressive masking; linear-probe and fine-tune all three; head distance and NMI; report.
        Re-running skips finished stages and resumes an interrupted one.
        """
        import os

        from hdcli.errors import HDError, did_you_mean

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see hd distill)
        if study:
            from hdcli.paper import study as run_study

            names = [r.strip() for r in rows.split(",") if r.strip()] if rows else None
            for r in names or []:
                if r not in run_study.ROWS:
                    raise HDError(f"unknown study row {r!r}", did_you_mean(r, run_study.ROWS))
            try:
                seed_list = [int(s) for s in seeds.split(",") if s.strip()]
            except ValueError:
                raise HDError(f"--seeds takes comma-separated integers, got {seeds!r}") from None
            run_study.study(out or Path("runs/mini-study"), seeds=seed_list, quick=quick, rows=names, source=data,
                            force=force)
            return
        from hdcli.paper import demo as run_demo

        run_demo.demo(out or Path("runs/demo"), quick=quick, force=force, seed=seed)
