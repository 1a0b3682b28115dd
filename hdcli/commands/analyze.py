"""``hd analyze``: average head distance, NMI and attention maps of ViTs, as JSON and PNG plots."""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from hdcli.errors import HDError

MODELS_HELP = ("Models to compare: registry names (mae, clip, dinov3, ...), timm tags, "
               "`local-dir:PATH` or a run's `student/` directory.")
DATA_PANEL = "Images"
RUN_PANEL = "Run"

Models = Annotated[list[str], typer.Argument(help=MODELS_HELP, show_default=False)]
Data = Annotated[str | None, typer.Option(
    "--data", help="Image source: an image folder, WebDataset shards, `fashion-mnist[:DIR]`, "
    "`cifar100:DIR`, or `demo` (default: the built-in demo set).", rich_help_panel=DATA_PANEL)]
ImgSize = Annotated[int | None, typer.Option(
    "--img-size", min=8, help="Input size in pixels (default: each model's own). Images are resized "
    "(shorter side, bicubic) and centre-cropped to it.", rich_help_panel=DATA_PANEL)]
Seed = Annotated[int, typer.Option("--seed", help="Seed for picking the images.", rich_help_panel=DATA_PANEL)]
BatchSize = Annotated[int, typer.Option(
    "--batch-size", min=1, help="Images per forward pass (bounds memory).", rich_help_panel=RUN_PANEL)]
Out = Annotated[Path, typer.Option("--out", help="Output directory.", rich_help_panel=RUN_PANEL)]
SkipMissing = Annotated[bool, typer.Option(
    "--skip-missing", help="Warn about models that cannot be loaded (e.g. not cached offline) and go on "
    "with the others.", rich_help_panel=RUN_PANEL)]
Device = Annotated[str, typer.Option(
    "--device", help="Torch device: auto (cuda if available), cpu, cuda, cuda:1, ...", rich_help_panel=RUN_PANEL)]
CacheDir = Annotated[Path | None, typer.Option(
    "--cache-dir", help="Hugging Face hub cache holding the teachers (default: HF_HUB_CACHE).",
    rich_help_panel=RUN_PANEL)]

DEFAULT_OUT = Path("runs/analyze")


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        name="analyze", no_args_is_help=True,
        help="Attention analysis (paper Fig. 1, 2, 5): average head distance, NMI and attention maps "
        "per block and head, for any number of models at once.",
    )
    sub.command("head-distance")(_metric_command("head_distance"))
    sub.command("nmi")(_metric_command("nmi"))
    sub.command("attention")(attention)
    app.add_typer(sub, name="analyze")


METRIC_HELP = {
    "head_distance": "Average head distance per block and head (pixels); writes head_distance.json and .png."
    "\n\nValue = Σ_j A_ij·D_ij with D_ij the pixel distance between patches i and j, averaged over query "
    "patches and images (paper Fig. 1, 5a).",
    "nmi": "Normalised mutual information per block and head; writes nmi.json and nmi.png."
    "\n\nNMI = I(q, k) / sqrt(H(q)·H(k)) with p(q) = 1/N and p(k|q) the attention, per image, averaged "
    "over images (paper Fig. 2, 5b).",
}


def _metric_command(metric: str):
    """The command for one metric of METRIC_HELP (the two share every option)."""

    def command(
        models: Models, data: Data = None,
        images: Annotated[int, typer.Option("--images", min=1, help="Number of images.",
                                            rich_help_panel=DATA_PANEL)] = 256,
        img_size: ImgSize = None, seed: Seed = 0, batch_size: BatchSize = 32, out: Out = DEFAULT_OUT,
        skip_missing: SkipMissing = False, device: Device = "auto", cache_dir: CacheDir = None,
    ) -> None:
        _metric(metric, models, data, images, img_size, seed, batch_size, out, skip_missing, device,
                cache_dir)

    command.__doc__ = METRIC_HELP[metric]
    return command


def attention(
    models: Models, data: Data = None,
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images (one grid row per "
                                        "image and query).", rich_help_panel=DATA_PANEL)] = 4,
    query: Annotated[list[str] | None, typer.Option(
        "--query", help="Query point X,Y as fractions of the image width and height (0.5,0.5 = centre); "
        "the patch holding it is the query. Repeat for several.", rich_help_panel="Attention")] = None,
    blocks: Annotated[str | None, typer.Option(
        "--blocks", help="Comma-separated 0-based blocks to show, negatives count from the end "
        "(default: 4 evenly spaced, ending with the last).", rich_help_panel="Attention")] = None,
    head: Annotated[int | None, typer.Option(
        "--head", min=0, help="Show one head (default: the mean over heads).", rich_help_panel="Attention")] = None,
    img_size: ImgSize = None, seed: Seed = 0, batch_size: BatchSize = 32, out: Out = DEFAULT_OUT,
    skip_missing: SkipMissing = False, device: Device = "auto", cache_dir: CacheDir = None,
) -> None:
    """Attention maps of query patches overlaid on the image; writes attention_<model>.png.

    One PNG grid per model (paper Fig. 5c): a row per image and query, a column per block.
    """
    from hdcli.models import vit
    from hdcli.tools import analyze
    from hdcli.ui import info

    queries = [_parse_query(q) for q in (query or ["0.5,0.5"])]
    dev, loaded = _setup(models, data, out, device, skip_missing=skip_missing, img_size=img_size,
                         cache_dir=cache_dir)
    chosen = {name: _parse_blocks(blocks, m, name) for name, m in loaded.items()}
    for name, m in loaded.items():
        if head is not None and head >= vit.num_heads(m):
            raise HDError(f"--head {head} is out of range for {name}",
                          f"it has {vit.num_heads(m)} heads (0..{vit.num_heads(m) - 1})")
    pics = _images(data, images, seed)
    with _progress(len(pics) * len(loaded)) as advance:
        for name, m in loaded.items():
            maps = analyze.attention_maps(m, pics, queries, chosen[name], head=head, batch_size=batch_size,
                                          device=dev, on_chunk=advance)
            crops = analyze.crop(pics, analyze.input_size(m))
            path = out / f"attention_{_slug(name)}.png"
            what = "mean over heads" if head is None else f"head {head}"
            analyze.plot_attention(crops, maps, queries, chosen[name], path, title=f"{name} ({what})")
            m.cpu()
            info(f"wrote {path}")


# ---------------------------------------------------------------------------------------------


def _metric(metric, names, data, n_images, img_size, seed, batch_size, out, skip_missing, device,
            cache_dir) -> None:
    from hdcli.tools import analyze
    from hdcli.ui import info

    dev, loaded = _setup(names, data, out, device, skip_missing=skip_missing, img_size=img_size,
                         cache_dir=cache_dir)
    decoders = _decoders(loaded)
    pics = _images(data, n_images, seed)
    results = {}
    with _progress(len(pics) * sum(len(d) or 1 for d in decoders.values())) as advance:
        for name, m in loaded.items():
            for label, decoder in (decoders[name] or {name: None}).items():  # a run's encoder + each decoder
                results[label] = analyze.measure(m, pics, metric, batch_size=batch_size, device=dev,
                                                 on_chunk=advance, decoder=decoder)
            m.cpu()
    json_path, png_path = out / f"{metric}.json", out / f"{metric}.png"
    analyze.write_json(json_path, metric, len(pics), results)
    analyze.plot_metric(metric, results, png_path, n_images=len(pics))
    _print_table(metric, results)
    info(f"wrote {json_path} and {png_path}")


def _source(name: str) -> str:
    """What to load for a model name: ``local-dir:`` the student directory of a run dir (or of a student/ dir, a
    local-dir:), else the name itself (a registry name or timm tag)."""
    from hdcli.teachers.load import student_dir

    raw = name.removeprefix("local-dir:")
    if not name.startswith("local-dir:") and not Path(raw).expanduser().exists():
        return name  # a registry name, timm tag or hf-hub: repo
    d = student_dir(name)
    return name if d is None else f"local-dir:{d}"


def _decoders(loaded: dict) -> dict[str, dict]:
    """The decoders a distillation run exported beside its student (paper Sec. 2: analysed after its encoder):
    model name -> {entry name: decoder} (empty: none). One decoder keeps the model's name; several are named
    ``<model>+<target>``."""
    from hdcli.method.heads import decoders_of, load_decoder
    from hdcli.ui import info

    out = {}
    for name, model in loaded.items():
        source = _source(name)  # a run's student directory, where its decoders lie
        found = decoders_of(Path(source.removeprefix("local-dir:"))) if source.startswith("local-dir:") else {}
        out[name] = {(name if len(found) == 1 else f"{name}+{key}"): load_decoder(path) for key, path in found.items()}
        if found:
            info(f"{name}: the encoder's {len(model.blocks)} blocks, then its decoder's (d0, d1, ...)")
    return out


def _setup(names, data, out, device, *, skip_missing, img_size, cache_dir):
    """Check the cheap inputs (device, --data, --out) before loading the models; create --out only once
    they all loaded. Returns (device, {name: model})."""
    from hdcli.data import parse_source

    dev = _device(device)
    parse_source(data)
    if out.exists() and not out.is_dir():
        raise HDError(f"--out {out} is a file", "give a directory")
    loaded = _load_models(names, skip_missing=skip_missing, img_size=img_size, cache_dir=cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    return dev, loaded


def _device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise HDError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HDError(f"device {device!r} requested but CUDA is not available", "use --device cpu")
    return dev


def _load_models(names: list[str], *, skip_missing: bool, img_size: int | None, cache_dir: Path | None):
    """Resolve every name first (a typo fails even with --skip-missing), then load and check each."""
    from hdcli import teachers
    from hdcli.tools import analyze
    from hdcli.ui import warn

    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise HDError(f"model {dupes[0]} is given more than once", "name each model once")
    source = {name: _source(name) for name in names}  # a run dir: its student/
    for name in names:
        teachers.resolve(source[name])
    loaded = {}
    for name in names:
        try:
            loaded[name] = teachers.load(source[name], cache_dir=cache_dir, img_size=img_size)
        except HDError as e:
            if not skip_missing:
                hint = "; ".join(h for h in (e.hint, "or pass --skip-missing to go on without it") if h)
                raise HDError(e.problem, hint) from e
            warn(f"skipping {name}: {e}")
            continue
        analyze.check_blocks(loaded[name])
    if not loaded:
        raise HDError("none of the models could be loaded", "see the warnings above")
    return loaded


def _images(data: str | None, n: int, seed: int) -> list:
    from hdcli import data as hdata
    from hdcli.ui import warn

    pics = hdata.sample_images(data, n, seed=seed)
    if not pics:
        raise HDError(f"no images found in {data or 'demo'}", "check --data")
    if len(pics) < n:
        warn(f"{data or 'demo'} holds {len(pics)} images; using all of them instead of {n}")
    return pics


@contextmanager
def _progress(total: int):
    """A progress bar over images × models; yields an ``advance(n)`` callback."""
    from hdcli.ui import progress

    with progress() as bar:
        task = bar.add_task("analyse", total=total, info="")
        yield lambda n: bar.advance(task, n)


def _print_table(metric: str, results: dict[str, dict]) -> None:
    from rich.table import Table

    from hdcli import ui

    table = Table(title=f"{metric} (mean over heads)", title_justify="left")
    table.add_column("block", justify="right")
    for name in results:
        table.add_column(name, justify="right")
    from hdcli.tools.analyze import block_labels

    depth = max(len(r["per_block"]) for r in results.values())
    for b, label in enumerate(block_labels(results, depth)):
        table.add_row(label, *(f"{r['per_block'][b]:.4g}" if b < len(r["per_block"]) else ""
                                for r in results.values()))
    ui.stdout.print(table)


def _parse_query(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError as e:
        raise HDError(f"--query {text!r} is not X,Y", "give fractions of width and height, e.g. 0.5,0.5") from e
    if not (0 <= x <= 1 and 0 <= y <= 1):
        raise HDError(f"--query {text!r} is outside the image", "X and Y are fractions between 0 and 1")
    return x, y


def _parse_blocks(text: str | None, model, name: str) -> list[int]:
    """--blocks as 0-based indices of ``model`` (negatives count from the end); default 4 evenly spaced."""
    from hdcli.models import vit

    depth = vit.depth(model)
    if text is None:
        return [round(depth * (k + 1) / 4) - 1 for k in range(4)] if depth >= 4 else list(range(depth))
    try:
        raw = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise HDError(f"--blocks {text!r} is not a comma-separated list of integers", "e.g. --blocks 2,5,8,11") from e
    if not raw:
        raise HDError("--blocks is empty", "e.g. --blocks 2,5,8,11")
    return list(vit.check_blocks(model, [b + depth if b < 0 else b for b in raw], name))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name).strip("-.") or "model"
