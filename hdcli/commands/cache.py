"""``hd cache-targets``: run a recipe's teachers once over its data, for K augmented views per image, into a
target cache that ``hd distill --targets-cache`` trains from without loading a teacher (docs/scale.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PANEL = "Cache"


def register(app: typer.Typer) -> None:
    @app.command("cache-targets")
    def cache_targets(
        out: Annotated[Path, typer.Option("--out", "-o", help="The cache directory (a new one, or one to complete).",
                                          rich_help_panel=PANEL, show_default=False)],
        recipe: Annotated[Path | None, typer.Option(
            "--recipe", help="The distill recipe whose teachers, targets, keep settings and image size define the "
            "cache.", rich_help_panel=PANEL, show_default=False)] = None,
        data_src: Annotated[str | None, typer.Option(
            "--data", help="The data (anything hd distill --data takes; default: the recipe's).",
            rich_help_panel=PANEL, show_default=False)] = None,
        views: Annotated[int, typer.Option("--views", help="Augmented views per image (K): each epoch of a run "
                                           "from the cache draws one.", rich_help_panel=PANEL)] = 2,
        dtype: Annotated[str, typer.Option("--dtype", help="fp16 | bf16 | fp32: the stored targets.",
                                           rich_help_panel=PANEL)] = "fp16",
        maxcount: Annotated[int, typer.Option("--maxcount", help="Images per shard.", rich_help_panel=PANEL)] = 1000,
        batch_size: Annotated[int | None, typer.Option(
            "--batch-size", "-b", help="Images per teacher pass (× views) (default: the recipe's).",
            rich_help_panel=PANEL, show_default=False)] = None,
        estimate: Annotated[bool, typer.Option("--estimate", help="Print the bytes per view, per epoch and in all, "
                                               "and stop (nothing runs).", rich_help_panel=PANEL)] = False,
        cpu: Annotated[bool, typer.Option("--cpu", help="Use the CPU even where a GPU is visible.",
                                          rich_help_panel=PANEL)] = False,
        set_: Annotated[list[str] | None, typer.Option(
            "--set", help="Any config key of the recipe, TOML value (repeatable).", metavar="KEY=VALUE",
            rich_help_panel=PANEL, show_default=False)] = None,
    ) -> None:
        """Run the teachers once over the data and write their targets (keep set + targets at the kept tokens, K
        views per image) to WebDataset shards. Resumable: run it again to complete a killed cache."""
        import os

        from hdcli import config
        from hdcli.cache import write

        overrides = {"data.source": data_src, "train.cpu": cpu or None, **config.parse_assignments(set_ or [])}
        cfg = config.load_config(config.DistillConfig, recipe=recipe, overrides=overrides)
        write.write(cfg, out, views=views, dtype=dtype, per_shard=maxcount, batch_size=batch_size, estimate=estimate,
                    rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)))
