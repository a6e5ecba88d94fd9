"""Input-pipeline speed: our OpenCV multi-crop against a PIL reference of the same augmentation.

The official MerMED-FM code augments PIL images with torchvision transforms. torchvision does not
import beside the CPU torch here, so `pil_crop` re-implements the PIL code paths those transforms
take, op for op: RandomRotation (PIL `rotate`, NEAREST, same canvas, fill 0), RandomResizedCrop
(`crop` then `resize` BICUBIC, which antialiases), RandomHorizontalFlip (`transpose`),
ColorJitter (ImageEnhance Brightness / Contrast / Color, and adjust_hue's uint8 HSV shift, in a
random order), and the DINO-lineage GaussianBlur (`ImageFilter.GaussianBlur(radius=sigma)`). Both
sides draw their parameters with `data_pipelines.multicrop.sample_multicrop`, torchvision's sampling
rules, so they do the same work per image.

Rates are images per CPU-second (process CPU time, so per core and insensitive to other load on
the machine), with OpenCV held to one thread. Three columns:
  pil       decode (PIL) + 12 crops -> uint8 arrays, the reference
  ours      decode (records.decode_image) + multicrop.multicrop into a batch buffer
  pipeline  the full Grain training pipeline over TFRecord shards written to a temp dir:
            read + CRC + parse + decode + multi-crop + modality-balanced batching

With --data, only the training pipeline is measured, over converted dataset directories given as
local paths or gs:// / s3:// URLs, interleaved round by round: images per CPU-second of this
process (every thread of it counts: Grain's readers, the storage client's event loop) and images
per wall-clock second, with the batches' multi-crop at the paper's settings. bench/bucket_loading.py
runs it against a local GCS emulator.

Usage:
  .venv/bin/python -m bench.input_pipeline --realdata ../shared/realdata [--images 64] [--seconds 5] [--rounds 3]
  .venv/bin/python -m bench.input_pipeline --data DIR_OR_URL [...] [--read-threads 2] [--seconds 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import pathlib
import platform
import tempfile
import time
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from data_pipelines import multicrop


def _pil_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision.transforms.functional_pil.adjust_hue."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.int8(int(factor * 255)).view(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


_PIL_JITTER = {
    "brightness": lambda img, f: ImageEnhance.Brightness(img).enhance(f),
    "contrast": lambda img, f: ImageEnhance.Contrast(img).enhance(f),
    "saturation": lambda img, f: ImageEnhance.Color(img).enhance(f),
    "hue": _pil_hue,
}


def pil_crop(img: Image.Image, params: multicrop.CropParams, size: int,
             rotate_resample: int = Image.NEAREST) -> Image.Image:
    """One crop through torchvision's PIL code paths (see module docstring)."""
    img = img.rotate(params.angle, resample=rotate_resample, expand=False, fillcolor=(0, 0, 0))
    top, left, h, w = params.box
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    if params.flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if params.jitter is not None:
        for name, factor in params.jitter:
            img = _PIL_JITTER[name](img, factor)
    if params.blur_sigma is not None:
        img = img.filter(ImageFilter.GaussianBlur(radius=params.blur_sigma))
    return img


def pil_multicrop(img: Image.Image, rng: np.random.Generator, cfg: multicrop.MultiCropConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The reference multi-crop of one RGB PIL image, as uint8 arrays like `multicrop.multicrop`."""
    globals_, locals_ = multicrop.sample_multicrop(rng, img.height, img.width, cfg)
    g = np.stack([np.asarray(pil_crop(img, p, cfg.global_size)) for p in globals_])
    loc = np.stack([np.asarray(pil_crop(img, p, cfg.local_size)) for p in locals_])
    return g, loc


def load_encoded(realdata: pathlib.Path, which: str, count: int) -> list[bytes]:
    """The first `count` encoded files (sorted names) of the ISIC or NIH set, as bytes."""
    if which == "isic":
        paths = sorted((realdata / "derm_isic_uda1" / "images").glob("*.jpg"))
    else:
        paths = sorted((realdata / "cxr_nih1000" / "NIH1000" / "train").glob("*/*.png"))
    if not paths:
        raise FileNotFoundError(f"no {which} images under {realdata}")
    return [p.read_bytes() for p in paths[:count]]


def _measure(work: Callable[[], int], seconds: float) -> float:
    """Images per CPU-second of repeated `work()` calls (each returns images done) over `seconds` of CPU."""
    done, start = 0, time.process_time()
    while time.process_time() - start < seconds:
        done += work()
    return done / (time.process_time() - start)


def pil_work(blobs: list[bytes], cfg: multicrop.MultiCropConfig) -> Callable[[], int]:
    """One pass of the reference over the images: PIL decode + multi-crop."""
    rng = np.random.default_rng(0)

    def work() -> int:
        for blob in blobs:
            pil_multicrop(Image.open(io.BytesIO(blob)).convert("RGB"), rng, cfg)
        return len(blobs)

    return work


def ours_work(blobs: list[bytes], cfg: multicrop.MultiCropConfig) -> Callable[[], int]:
    """One pass of ours over the images: OpenCV decode + multi-crop into a batch buffer."""
    from data_pipelines import records

    rng = np.random.default_rng(0)
    global_out = np.empty((cfg.num_global, cfg.global_size, cfg.global_size, 3), np.uint8)
    local_out = np.empty((cfg.num_local, cfg.local_size, cfg.local_size, 3), np.uint8)

    def work() -> int:
        for blob in blobs:
            multicrop.multicrop(records.decode_image(blob, channels=3), rng, cfg, global_out, local_out)
        return len(blobs)

    return work


def write_dataset(blobs: list[bytes], modality: str, directory: pathlib.Path) -> pathlib.Path:
    """The images as a converted dataset (4 TFRecord shards + manifest), as the converter writes."""
    from data_pipelines import manifest, records

    directory.mkdir(parents=True)
    fmt = "jpeg" if blobs[0][:3] == b"\xff\xd8\xff" else "png"
    shards = []
    for s, part in enumerate(np.array_split(np.arange(len(blobs)), 4)):
        payloads = []
        for i in part:
            h, w, c = records.decode_image(blobs[i], channels=3).shape
            payloads.append(records.encode_example(image=blobs[i], image_format=fmt, height=h, width=w, channels=c,
                                                   modality=modality, labels=[0], dataset="bench",
                                                   image_id=f"bench-{i}"))
        name = manifest.shard_name("train", s, 4, "tfrecord")
        records.write_tfrecords(directory / name, payloads)
        shards.append(manifest.Shard(name, len(payloads), manifest.file_sha256(directory / name)))
    split = manifest.Split(tuple(shards), len(blobs), (len(blobs),), (0.5,) * 3, (0.25,) * 3)
    manifest.save_manifest(manifest.Manifest(
        dataset="bench", modality=modality, format="tfrecord", label_names=("x",), multi_label=False,
        pixel_depth=8, channels=3, feature_spec=records.FEATURE_SPEC, splits={"train": split}), directory)
    return directory


def pipeline_work(directory: pathlib.Path, cfg: multicrop.MultiCropConfig, batch: int = 32) -> Callable[[], int]:
    """One batch of the Grain training pipeline, on one thread in this process (so CPU time is all of it)."""
    from data_pipelines.pipeline import TrainConfig, train_iterator

    config = TrainConfig(dirs=(str(directory),), per_device_batch=batch, crops=cfg, read_threads=0, prefetch=1)
    iterator = train_iterator(config, process_index=0, process_count=1, local_devices=1)
    return lambda: len(next(iterator)["modality"])


def loader_rates(dirs: list[str], cfg: multicrop.MultiCropConfig, seconds: float, read_threads: int,
                 batch: int = 32) -> Callable[[], tuple[float, float]]:
    """A measurement of the Grain training pipeline over `dirs`: (images per CPU-second of this
    process, images per wall-second) over `seconds` of wall time. The iterator is made and warmed
    up once (indexing, the first batches), so each call measures the steady state."""
    from data_pipelines.pipeline import TrainConfig, train_iterator

    config = TrainConfig(dirs=tuple(dirs), per_device_batch=batch, crops=cfg, read_threads=read_threads,
                         prefetch=max(1, read_threads))
    iterator = train_iterator(config, process_index=0, process_count=1, local_devices=1)
    for _ in range(2):
        next(iterator)

    def measure() -> tuple[float, float]:
        images, cpu, wall = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - wall < seconds:
            images += len(next(iterator)["modality"])
        return images / (time.process_time() - cpu), images / (time.perf_counter() - wall)

    return measure


def compare_locations(locations: list[str], args: argparse.Namespace) -> None:
    """The --data table: one row per location, medians of interleaved rounds."""
    cfg = multicrop.MultiCropConfig()
    measures = [loader_rates([location], cfg, args.seconds, args.read_threads) for location in locations]
    rates = np.array([[measure() for measure in measures] for _ in range(args.rounds)])  # round, location, kind
    cpu, wall = np.median(rates, axis=0).T
    print(f"| data | img/CPU-s | img/s (wall) | vs first, CPU | vs first, wall |  ({args.read_threads} read threads, "
          f"median of {args.rounds} x {args.seconds:g} s)")
    print("|---|---|---|---|---|")
    for location, c, w in zip(locations, cpu, wall):
        print(f"| {location} | {c:.1f} | {w:.1f} | {c / cpu[0]:.2f}x | {w / wall[0]:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realdata", default=os.environ.get("MERMED_REALDATA", "../shared/realdata"),
                        help="folder holding derm_isic_uda1/ and cxr_nih1000/ (default $MERMED_REALDATA)")
    parser.add_argument("--images", type=int, default=64, help="images per set, cycled")
    parser.add_argument("--seconds", type=float, default=5.0, help="CPU seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements of each column, interleaved; the median is reported")
    parser.add_argument("--data", nargs="+", metavar="DIR_OR_URL",
                        help="measure only the training pipeline over these converted datasets (paths or URLs); "
                             "--seconds is then wall time per measurement")
    parser.add_argument("--read-threads", type=int, default=2, help="Grain read threads with --data")
    args = parser.parse_args()

    import cv2

    cv2.setNumThreads(1)
    if args.data:
        compare_locations(args.data, args)
        return
    cfg = multicrop.MultiCropConfig()  # 2 x 224 + 10 x 96, the paper's settings
    realdata = pathlib.Path(args.realdata)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}, opencv {cv2.__version__}, "
          f"pillow {Image.__version__}; median of {args.rounds} x {args.seconds:g} CPU-s per column")
    print("| images | pil img/CPU-s | ours img/CPU-s | pipeline img/CPU-s | ours / pil | pipeline / pil |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for which, modality, label in (("isic", "derm", "ISIC 384 px JPEG"), ("nih", "cxr", "NIH 64 px PNG")):
            blobs = load_encoded(realdata, which, args.images)
            works = [pil_work(blobs, cfg), ours_work(blobs, cfg),
                     pipeline_work(write_dataset(blobs, modality, pathlib.Path(tmp) / which), cfg)]
            for work in works:
                work()  # warm-up: caches, lazy imports, the pipeline's first batch
            # Interleaved rounds, so a change in machine load hits every column alike.
            rates = np.array([[_measure(work, args.seconds) for work in works] for _ in range(args.rounds)])
            pil, ours, pipe = np.median(rates, axis=0)
            print(f"| {label} | {pil:.1f} | {ours:.1f} | {pipe:.1f} | {ours / pil:.2f}x | {pipe / pil:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
