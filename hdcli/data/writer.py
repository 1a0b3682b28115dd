"""``hd data shards``: write a source as WebDataset shards (``{split}-{000000..}.tar``) and timm's ``_info.json``."""
from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from pathlib import Path

import webdataset as wds
from PIL import Image

from hdcli import ui
from hdcli.data.records import open_records
from hdcli.data.source import SPLIT_DIRS, Source, is_shard_name, parse_source, split_alias
from hdcli.errors import HDError, did_you_mean
from hdcli.rundir import write_json

# ---------------------------------------------------------------------------------------------------------
# Shard writer


def _writable_splits(src: Source) -> list[str]:
    if src.kind == "folder":
        root = Path(src.path)
        present = [s for s in ("train", "val") if any((root / d).is_dir() for d in SPLIT_DIRS[s])]
        return present or ["train"]
    return ["train", "val"]


def write_shards(source: str | os.PathLike | None, out: str | os.PathLike, *, maxcount: int = 1000,
                 splits: list[str] | None = None, image_format: str = "auto", quality: int = 95,
                 seed: int = 0, shuffle: bool = True, name: str | None = None, force: bool = False,
                 max_side: int | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write ``OUT/{split}-{000000..}.tar`` (``maxcount`` samples each: ``<ext>`` image + ``cls``) and
    timm's ``OUT/_info.json``; returns the info dict. Train samples are shuffled (seeded) so that each
    shard mixes classes; other splits keep their order. Unreadable images are skipped with a warning.

    image_format: ``auto`` keeps a folder's jpg/png/webp bytes as they are and stores arrays as PNG;
    ``png``/``jpg``/``webp`` re-encode everything.
    max_side: images whose shorter side is longer are resized (bicubic, antialiased) so that it is ``max_side``
    and stored as JPEG of ``quality`` (PNG for ``image_format="png"``); smaller ones are kept as ``auto`` would
    (FFCV's practice: decoding a 4 MP photo to train at 224 px wastes most of the decode).
    """
    if maxcount < 1:
        raise HDError(f"--maxcount must be at least 1, got {maxcount}")
    if max_side is not None and max_side < 1:
        raise HDError(f"--max-side must be at least 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise HDError(f"--quality must lie in 1..100, got {quality}")
    if image_format not in ("auto", "png", "jpg", "webp"):
        raise HDError(f"unknown image format {image_format!r}", did_you_mean(image_format, ["auto", "png", "jpg", "webp"]))
    src = parse_source(source)
    if src.kind == "shards":
        raise HDError(f"{src.spec} is already WebDataset shards", "give an image folder, demo, fashion-mnist or cifar100:DIR")
    splits = [split_alias(s) for s in (splits or _writable_splits(src))]
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    old = [f for f in out.iterdir() if f.name == "_info.json" or (is_shard_name(f.name) and f.name.startswith(
        tuple(f"{s}-" for s in splits)))]
    if old and not force:
        raise HDError(f"{out} already holds shards ({old[0].name}, ...)", "use --force to replace them, or another OUT")
    for f in old:
        f.unlink()
    records = {s: open_records(src, s) for s in splits}
    info: dict = {"name": name or (src.kind if src.kind != "folder" else Path(src.path).name),
                  "num_classes": len(records[splits[0]].classes),
                  "classes": list(records[splits[0]].classes), "splits": {}}
    for split in splits:
        rec = records[split]
        order = list(range(len(rec)))
        if shuffle and split == "train":
            random.Random(seed).shuffle(order)
        filenames, lengths, skipped = [], [], 0
        writer, count, done = None, 0, 0
        ok = False
        try:
            for i in order:
                try:
                    ext, data = _sample(rec, i, image_format, quality, max_side)
                except Exception as e:
                    skipped += 1
                    ui.warn(f"skipping unreadable image {rec.key(i)} in {rec.where}: {type(e).__name__}: {e}")
                    continue
                if writer is None or count >= maxcount:
                    if writer is not None:
                        _close_shard(writer, out / filenames[-1])
                        lengths.append(count)
                    filenames.append(f"{split}-{len(filenames):06d}.tar")
                    writer, count = wds.TarWriter(str(out / (filenames[-1] + ".tmp")), mtime=0), 0
                writer.write({"__key__": f"{split}_{done:08d}", ext: data, "cls": str(rec.label(i)).encode()})
                count += 1
                done += 1
                if on_progress:
                    on_progress(split, done + skipped, len(rec))
            ok = True
        except OSError as e:  # a full disk: no half shard, and say what is on disk
            raise HDError(f"could not write {out / filenames[-1]}: {e.strerror or e}; {len(lengths)} complete "
                          f"{split} shards are in {out}, without _info.json",
                          "free some space and run the same command with --force") from None
        except KeyboardInterrupt:
            ui.warn(f"interrupted: {len(lengths)} complete {split} shards are in {out}, without _info.json "
                    "(run the same command with --force to write them all)")
            raise
        finally:
            if writer is not None and ok:
                _close_shard(writer, out / filenames[-1])
                lengths.append(count)
            elif writer is not None:  # interrupted or failed: the shard being written is dropped
                try:
                    writer.close()
                except OSError:
                    pass
                Path(str(out / filenames[-1]) + ".tmp").unlink(missing_ok=True)
        if skipped:
            ui.warn(f"{split}: skipped {skipped} unreadable images of {len(rec)}")
        info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": filenames,
                                 "shard_lengths": lengths}
    try:
        write_json(out / "_info.json", info, indent=2)
    except OSError as e:
        raise HDError(f"could not write {out / '_info.json'}: {e.strerror or e}",
                      "free some space and run the same command with --force") from None
    return info


def _close_shard(writer, final: Path) -> None:
    writer.close()
    os.replace(str(final) + ".tmp", final)  # a crash never leaves a half-written shard under the final name


def _sample(rec, i: int, image_format: str, quality: int, max_side: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of sample i as written: as stored, re-encoded, or shrunk to ``max_side``."""
    if max_side is not None:
        img = rec.load(i)
        if min(img.size) > max_side:
            f = max_side / min(img.size)
            img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)
            return _reencode(img, "png" if image_format == "png" else ("webp" if image_format == "webp" else "jpg"),
                             quality)
    if image_format == "auto":
        return rec.encoded(i)
    return _reencode(rec.load(i), image_format, quality)


def _reencode(img: Image.Image, fmt: str, quality: int) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format="JPEG" if fmt == "jpg" else "WEBP", quality=quality)
    return fmt, buf.getvalue()



