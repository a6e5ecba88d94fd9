"""Conversion throughput per core: the local converter against the Beam pipeline on the same inputs.

Builds three inputs from ../shared/realdata, each once and `--repeat` times over (links under new
names, so every copy is an item of its own): the ISIC dermoscopy JPEGs (384 px, stored as they are,
decoded for the statistics), the CT DICOM series (512 x 512, HU to three windows, PNG-encoded) and
the NIH chest X-rays (64 px PNGs, where per-image overheads dominate). Each is converted through
the CLI, `--runner=local` and `--runner=beam` (Beam's local runner, worker processes), with 1 and 2
workers, into a fresh folder; the two runners' datasets are checked equal. Times are of the whole
command (start-up, listing, planning, manifest included); CPU-seconds are the command's and every
process it waited for (the local converter's pool, Beam's workers), from the kernel's child
accounting. The marginal rate, images per CPU-second between the single and the repeated input,
leaves out what a run costs whatever its size (start-up, imports, worker processes): the rate a
large corpus converts at; the fixed cost is the rest.

Usage (from the repository root):
  .venv/bin/python -m bench.convert_throughput --realdata ../shared/realdata [--repeat 20] [--workers 1 2]
"""
from __future__ import annotations

import argparse
import csv
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from data_pipelines.manifest import load_manifest


_LABELS = {"isic": "ISIC JPEG", "ct": "CT DICOM", "nih": "NIH PNG"}  # each input's name in the table


def _link(source: pathlib.Path, target: pathlib.Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve())


def _inputs(realdata: pathlib.Path, root: pathlib.Path, repeat: int) -> dict[str, list[str]]:
    """The CLI arguments of each input (kind, location, kind options), its files linked `repeat` times."""
    isic = realdata / "derm_isic_uda1"
    with open(isic / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            for copy in range(repeat):
                name = f"{row['image']}.jpg"
                _link(isic / "images" / name, root / "isic" / row["benign_malignant"] / f"{copy}_{name}")
    for path in sorted((realdata / "ct_totalsegmentator_example" / "example_ct_dicom").iterdir()):
        for copy in range(repeat):
            _link(path, root / "ct" / f"copy{copy}" / path.name)
    for path in sorted((realdata / "cxr_nih1000" / "NIH1000").rglob("*.png")):
        for copy in range(repeat):
            _link(path, root / "nih" / path.parent.name / f"{copy}_{path.name}")
    return {
        "isic": ["folder", str(root / "isic"), "--modality", "derm"],
        "ct": ["dicom", str(root / "ct"), "--modality", "ct", "--windows", "abdomen,lung,bone"],
        "nih": ["folder", str(root / "nih"), "--modality", "cxr"],
    }


def _timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and the processes it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _dataset_files(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _convert(source: list[str], name: str, out: pathlib.Path, key: pathlib.Path, runner: str, workers: int,
             shard_size: int) -> tuple[int, float, float, dict[str, bytes]]:
    """(images, wall s, CPU s, the dataset's files) of one conversion through the CLI."""
    wall, cpu = _timed([sys.executable, "-m", "data_pipelines.convert", *source, "--dataset", name, "--out", str(out),
                        "--id-key-file", str(key), "--workers", str(workers), "--shard-size", str(shard_size),
                        "--no-progress", f"--runner={runner}"])
    images = sum(s.num_records for s in load_manifest(out / name).splits.values())
    return images, wall, cpu, _dataset_files(out / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realdata", default=os.environ.get("MERMED_REALDATA", "../shared/realdata"))
    parser.add_argument("--repeat", type=int, default=20, help="copies of each input file in the large input")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=256)
    args = parser.parse_args()

    # BENCHMARKS.md's table, row for row.
    print("| input | images | runner | workers | wall s | CPU s | img per CPU-s | marginal img per CPU-s "
          "| fixed CPU s |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        key = root / "id.key"
        key.write_text(os.urandom(32).hex())
        small = _inputs(pathlib.Path(args.realdata), root / "small", 1)
        large = _inputs(pathlib.Path(args.realdata), root / "large", args.repeat)
        for name in large:
            for workers in args.workers:
                outputs = {}
                for runner in ("local", "beam"):
                    out = root / f"out-{runner}-{workers}"
                    few, _, few_cpu, _ = _convert(small[name], name, out / "small", key, runner, workers,
                                                  args.shard_size)
                    images, wall, cpu, outputs[runner] = _convert(large[name], name, out / "large", key, runner,
                                                                  workers, args.shard_size)
                    marginal = (images - few) / (cpu - few_cpu)
                    print(f"| {_LABELS[name]} | {images} | {runner} | {workers} | {wall:.1f} | {cpu:.1f} "
                          f"| {images / cpu:.1f} | {marginal:.1f} | {cpu - images / marginal:.1f} |", flush=True)
                if outputs["local"] != outputs["beam"]:
                    raise SystemExit(f"{name}: the Beam dataset differs from the local one")


if __name__ == "__main__":
    main()
