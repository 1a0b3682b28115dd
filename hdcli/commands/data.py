"""``hd data``: write WebDataset shards from any supported source, and show what a source holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

SRC_HELP = ("'demo', 'fashion-mnist[:DIR]', 'cifar100:DIR', an image folder (ROOT/CLASS/IMG or "
            "ROOT/{train,val}/CLASS/IMG)")


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Prepare and inspect datasets (WebDataset shards, image folders, built-in sets).",
                           no_args_is_help=True)

    @data_app.command("shards")
    def shards(
        src: Annotated[str, typer.Argument(help=f"Source: {SRC_HELP}.", show_default=False)],
        out: Annotated[Path, typer.Argument(help="Output directory for {split}-NNNNNN.tar and _info.json.",
                                            show_default=False)],
        maxcount: Annotated[int, typer.Option("--maxcount", help="Samples per shard.",
                                              rich_help_panel="Shards")] = 1000,
        splits: Annotated[str, typer.Option("--splits", help="Comma-separated splits to write "
                                            "(default: train and val, where SRC has them).",
                                            rich_help_panel="Shards", show_default=False)] = "",
        image_format: Annotated[str, typer.Option("--image-format", help="auto (keep a folder's jpg/png/webp "
                                                  "bytes, PNG for arrays), png, jpg or webp (re-encode).",
                                                  rich_help_panel="Shards")] = "auto",
        quality: Annotated[int, typer.Option("--quality", help="JPEG/WebP quality when re-encoding.",
                                             rich_help_panel="Shards")] = 95,
        max_side: Annotated[int | None, typer.Option(
            "--max-side", help="Resize images whose shorter side is longer to this (re-encoded at --quality): "
            "faster decoding (docs/data.md).", rich_help_panel="Shards", show_default=False)] = None,
        shuffle: Annotated[bool, typer.Option("--shuffle/--no-shuffle", help="Shuffle the train split before "
                                              "writing, so every shard mixes classes.",
                                              rich_help_panel="Shards")] = True,
        seed: Annotated[int, typer.Option("--seed", help="Seed of that shuffle.", rich_help_panel="Shards")] = 0,
        name: Annotated[str, typer.Option("--name", help="Dataset name in _info.json (default: from SRC).",
                                          rich_help_panel="Shards", show_default=False)] = "",
        force: Annotated[bool, typer.Option("--force", help="Replace shards and _info.json already in OUT.",
                                            rich_help_panel="Shards")] = False,
    ) -> None:
        """Write WebDataset shards (image + cls per sample) and timm's _info.json from SRC."""
        from hdcli import data, ui

        split_list = [s.strip() for s in splits.split(",") if s.strip()] or None
        with ui.progress() as bar:
            tasks: dict[str, int] = {}

            def on_progress(split: str, done: int, total: int) -> None:
                if split not in tasks:
                    tasks[split] = bar.add_task(f"writing {split}", total=total, info="")
                bar.update(tasks[split], completed=done)

            info = data.write_shards(src, out, maxcount=maxcount, splits=split_list, image_format=image_format,
                                     quality=quality, max_side=max_side, seed=seed, shuffle=shuffle, name=name or None,
                                     force=force, on_progress=on_progress)
        for split, entry in info["splits"].items():
            n = len(entry["filenames"])
            last = f"{n - 1:06d}"
            ui.info(f"{split}: {entry['num_samples']} samples in {n} shards "
                    f"[bold]{out}/{split}-{{000000..{last}}}.tar[/]")
        ui.info(f"wrote {out}/_info.json ({info['num_classes']} classes)")

    @data_app.command("info")
    def info(
        src: Annotated[str, typer.Argument(help=f"Source: {SRC_HELP}, or shards (DIR or pattern).",
                                           show_default=False)],
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    ) -> None:
        """Show a data source's kind, splits, sample counts and classes."""
        import json

        from rich.table import Table

        from hdcli import data, ui

        d = data.describe(src)
        if as_json:
            ui.stdout.print_json(json.dumps(d))
            return
        table = Table(title=f"{d['source']} ({d['kind']})")
        for col in ("split", "samples", "shards"):
            table.add_column(col, justify="right" if col != "split" else "left")
        for split, s in d["splits"].items():
            table.add_row(split, str(s.get("samples", s.get("error", ""))), str(s.get("shards", "")))
        ui.stdout.print(table)
        names = d.get("classes") or []
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        ui.stdout.print(f"{d['num_classes'] or 'unknown'} classes" + (f": {shown}" if shown else ""))

    app.add_typer(data_app, name="data")
