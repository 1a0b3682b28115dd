"""Synthetic ImageNet-like JPEG shards for `hd bench data` on a machine without data sets.

    .venv/bin/python benchmarks/jpeg_shards.py /tmp/jshards --images 512
    hd bench data /tmp/jshards --workers 8 --batch-size 128

Images are 500x375 (ImageNet's typical size), smooth colour fields with noise, JPEG quality 90 (about
65 KB each, like photos), in 4 class folders; written with `hdcli.data.write_shards` (the same writer as
`hd data shards`). Decoding them costs what decoding photos of that size costs. ``--photos`` makes them
from real photos instead (random 500x375 crops of scikit-learn's two sample photos, rescaled 0.8-1.25x,
quality 90, about 50 KB) and ``--folder`` leaves them as an image folder (no shards).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        d = folder / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC)).astype(np.int16)
        arr = np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{i:06d}.jpg", quality=90)


def make_photos(folder: Path, n: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 640x427
    for i in range(n):
        d = folder / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        p = photos[i % 2]
        s = rng.uniform(0.8, 1.25)
        p = p.resize((max(500, round(p.width * s)), max(375, round(p.height * s))), Image.BICUBIC)
        x, y = rng.integers(0, p.width - 500 + 1), rng.integers(0, p.height - 375 + 1)
        p.crop((x, y, x + 500, y + 375)).save(d / f"{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="directory for train-NNNNNN.tar and _info.json")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--maxcount", type=int, default=128, help="images per shard")
    ap.add_argument("--photos", action="store_true", help="crops of real photos instead of synthetic images")
    ap.add_argument("--folder", action="store_true", help="write an image folder OUT/train/CLASS/*.jpg, no shards")
    args = ap.parse_args()

    from hdcli import data

    make = make_photos if args.photos else make_images
    if args.folder:
        make(Path(args.out), args.images)
        print(f"wrote {args.images} JPEGs to {args.out}/train")
        return
    with tempfile.TemporaryDirectory(prefix="hd-jpegs-") as tmp:
        make(Path(tmp), args.images)
        info = data.write_shards(tmp, args.out, maxcount=args.maxcount, image_format="auto", force=True)
    n = info["splits"]["train"]["num_samples"]
    print(f"wrote {n} JPEGs in {len(info['splits']['train']['filenames'])} shards to {args.out}")


if __name__ == "__main__":
    main()
