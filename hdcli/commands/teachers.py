"""``hd fetch-teachers``: fill the hub cache with teachers (download or ``--from-file``), verify, list.

torch/timm/huggingface_hub are imported inside the command: ``--offline`` must set HF_HUB_OFFLINE first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hdcli.errors import HDError

PANEL = "Teachers"


def register(app: typer.Typer) -> None:
    app.command("fetch-teachers", rich_help_panel=PANEL)(fetch_teachers)


def _split_names(values: list[str] | None) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def _parse_from_file(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise HDError(f"--from-file expects NAME=PATH, got '{v}'", "e.g. --from-file mae=mae_pretrain_vit_base.pth")
        out[name.strip()] = path.strip()
    return out


def fetch_teachers(
    names: Annotated[list[str] | None, typer.Argument(
        help="Teachers to fetch, comma- or space-separated: registry names (mae, clip, dinov3, ...), "
             "timm tags, hf-hub:ORG/NAME, or model directories.", metavar="NAMES", show_default=False)] = None,
    list_registry: Annotated[bool, typer.Option(
        "--list", help="Print the registry (name, timm tag, role) and whether each is in the cache.",
        rich_help_panel="Output")] = False,
    offline: Annotated[bool, typer.Option(
        "--offline", help="Download nothing: only verify that the cache already holds the teachers "
                          "(sets HF_HUB_OFFLINE=1).", rich_help_panel="Source")] = False,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Hub cache to fill/read \\[default: HF_HUB_CACHE, else ~/.cache/huggingface/hub]. "
                            "Other hd commands read HF_HUB_CACHE, so export it to match.",
        rich_help_panel="Source", show_default=False)] = None,
    from_file: Annotated[list[str] | None, typer.Option(
        "--from-file", metavar="NAME=PATH",
        help="Import a local checkpoint for NAME instead of downloading it: an original MAE .pth "
             "({'model': ...}), an OpenAI CLIP (visual.*) or DeiT state dict, a timm state dict or a "
             "safetensors file. Converted by timm's checkpoint filter and written into the cache. Repeatable.",
        rich_help_panel="Source", show_default=False)] = None,
) -> None:
    """Download teachers into the Hugging Face cache, or import checkpoint files, and verify them.

    Each teacher is loaded once to verify it; a table (name, tag, params, embed dim, heads, depth, file,
    sha256) is printed and [bold]teachers.json[/] written into the cache dir. Compute nodes then run with
    [bold]HF_HUB_OFFLINE=1[/] (or [bold]hd --offline[/]) on a copy of that cache (docs/teachers.md).
    """
    if offline:
        from hdcli.teachers.hub import set_offline

        set_offline()  # before huggingface_hub is imported below
    from hdcli import teachers

    if list_registry:
        _print_registry(teachers, cache_dir)
        return
    files = _parse_from_file(from_file)
    wanted = _split_names(names)
    if not wanted and not files:
        raise HDError("name the teachers to fetch", "e.g. `hd fetch-teachers mae,clip`; `hd fetch-teachers --list` "
                      "shows the registry")
    from huggingface_hub import constants

    from hdcli import ui

    offline = offline or constants.is_offline_mode()  # `hd --offline` / HF_HUB_OFFLINE=1 as well

    def step(name: str, i: int, n: int) -> None:
        ui.info(f"[bold]{name}[/] ({i + 1}/{n}): " + ("importing" if name in files else
                                                        "verifying the cache" if offline else "fetching"))

    records = teachers.fetch(wanted, cache_dir=cache_dir, offline=offline, from_files=files, progress=step)
    _print_records(records, teachers.default_cache_dir() if cache_dir is None else cache_dir.expanduser().resolve())


def _print_registry(teachers, cache_dir: Path | None) -> None:
    from rich.table import Table


    cache = Path(cache_dir).expanduser().resolve() if cache_dir else teachers.default_cache_dir()
    table = Table(title="teacher registry", caption=f"cache: {cache}")
    for col in ("name", "tag", "role", "family", "prefix tokens", "mean/std", "cached"):
        table.add_column(col, overflow="fold")
    for name, spec in teachers.REGISTRY.items():
        hit = teachers.cached_weights(spec, cache)
        mean, std = teachers.STATS[spec.stats]
        stats = f"{spec.stats}: {'/'.join(f'{v:.3g}' for v in mean)} ± {'/'.join(f'{v:.3g}' for v in std)}"
        table.add_row(name, spec.tag, spec.role or "", spec.family, spec.prefix, stats, "yes" if hit else "no")
    _print_table(table)


def _print_records(records: list[dict], cache: Path) -> None:
    from rich.table import Table


    table = Table(title="teachers", caption=f"cache: {cache}  ·  full paths and hashes: {cache / 'teachers.json'}")
    for col, kw in (("name", {"no_wrap": True}), ("tag", {}), ("params", {"justify": "right"}),
                    ("embed dim", {"justify": "right"}), ("heads", {"justify": "right"}),
                    ("depth", {"justify": "right"}), ("file", {}), ("sha256", {"no_wrap": True})):
        table.add_column(col, overflow="fold", **kw)
    for r in records:
        file = "-"
        if r["file"]:  # the snapshot file as `name @revision`; the manifest has the path
            file = Path(r["file"]).name + (f" @{r['revision'][:8]}" if r.get("revision") else "")
        table.add_row(r["name"], r["tag"], f"{r['params'] / 1e6:.1f}M", str(r["embed_dim"] or "-"),
                      str(r["num_heads"] or "-"), str(r["depth"] or "-"), file, (r["sha256"] or "-")[:12])
    _print_table(table)


def _print_table(table) -> None:
    """On a terminal fit its width; piped into a file or log, print rows unwrapped (rich assumes 80 columns)."""
    from rich.console import Console
    from rich.measure import Measurement

    from hdcli import ui

    out = ui.stdout
    if not out.is_terminal:
        wide = Measurement.get(out, out.options.update_width(1000), table).maximum
        out = Console(file=out.file, highlight=False, width=max(out.width, wide))
    out.print(table)
