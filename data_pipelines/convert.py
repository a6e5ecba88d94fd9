"""One CLI for every source kind: `python -m data_pipelines.convert <kind> ... --out DIR`.

Kinds:
    folder    ROOT/<class>/* or ROOT/<split>/<class>/* (PNG/JPEG/...)
    csv       a CSV manifest: path, labels (multi-label with a separator), optional split, patient id
    medmnist  MedMNIST npz files (any 2D flag and size)
    dicom     a folder of DICOM files (CT to HU windows, MONOCHROME1, palette, multi-frame)
    nifti     NIfTI CT volumes (axial slices at a stride, HU windows as channels)
    demo      synthetic images of all seven modalities (no key needed)
    new-key   create an id key file (keep it outside the output directory)

Each conversion writes DIR/<dataset>/ (see data_pipelines/manifest.py), runs in --workers
processes, resumes when re-run with the same arguments, and prints a summary of written records and
skipped inputs. With --runner=beam the same conversion runs as an Apache Beam pipeline (Beam's
local runner with --workers processes, or a cluster through --beam-options; docs/beam.md) and
writes the same files. Image ids are HMACs keyed by --id-key-file or $MERMED_ID_KEY. Nothing written or
printed names a source file or holds a DICOM tag value, except that an error stopping a conversion
of a non-DICOM source names the offending file. Burned-in text in pixels is not removed.

Examples:
    python -m data_pipelines.convert new-key ~/mermed_id.key
    python -m data_pipelines.convert medmnist ~/medmnist/*.npz --out data --id-key-file ~/mermed_id.key
    python -m data_pipelines.convert csv labels.csv --modality cxr --label-column nih_finding_labels \\
        --multi-label --none-value "No Finding" --split-column split --patient-column patient_id \\
        --dataset nih14 --out data --id-key-file ~/mermed_id.key
    python -m data_pipelines.convert dicom ./ct_series --modality ct --windows abdomen,lung,bone \\
        --dataset ct1 --out data --id-key-file ~/mermed_id.key --skip-bad
    python -m data_pipelines.convert dicom ./ct_series --modality ct --dataset ct1 --out data \\
        --id-key-file ~/mermed_id.key --skip-bad --runner=beam --workers 2
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import shlex
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from data_pipelines import privacy, storage
from data_pipelines.modalities import MODALITIES
from data_pipelines.shard_writer import ConversionError, ConvertOptions, convert
from data_pipelines.sources.base import Source
from data_pipelines.sources.csv_manifest import CsvSource
from data_pipelines.sources.ct import DEFAULT_WINDOWS, parse_windows
from data_pipelines.sources.dicom import DicomSource
from data_pipelines.sources.image_folder import ImageFolderSource
from data_pipelines.sources.medmnist import MedMnistSource
from data_pipelines.sources.nifti import NiftiSource
from data_pipelines.sources.synthetic import demo_jobs, demo_key, write_demo_data
from data_pipelines.splits import parse_fractions

if TYPE_CHECKING:
    from apache_beam.options.pipeline_options import PipelineOptions


def _common(parser: argparse.ArgumentParser, *, dataset_required: bool = True) -> None:
    parser.add_argument("--out", required=True,
                        help="output root, a local path or a gs:// or s3:// URL; the dataset goes to OUT/DATASET")
    parser.add_argument("--dataset", required=dataset_required, help="dataset name (directory and Example field)")
    parser.add_argument("--id-key-file", help=f"HMAC key for image ids, a local path or a gs:// or s3:// URL "
                                               f"(else ${privacy.KEY_ENV})")
    parser.add_argument("--shard-size", type=int, default=1024, help="source items per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-bad", action="store_true", help="skip and count bad inputs instead of stopping")
    parser.add_argument("--splits", type=parse_fractions, default="train=0.8,val=0.1,test=0.1",
                        help="fractions for the stratified split made when the source gives none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing conversion in OUT/DATASET")
    parser.add_argument("--no-progress", action="store_true")
    _runner(parser)


def _runner(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runner", choices=("local", "beam"), default="local",
                        help="local: --workers processes; beam: an Apache Beam pipeline writing the same files")
    parser.add_argument("--beam-options", default="",
                        help="Beam pipeline options as one string, e.g. \"--runner=DataflowRunner --project=P ...\" "
                             "(default: Beam's local runner with --workers processes; docs/beam.md)")


def _modality(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--modality", choices=MODALITIES, required=required)
    parser.add_argument("--channels", type=int, choices=(1, 3), help="stored channels (default by modality)")


def _windows(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--windows", type=parse_windows, default=",".join(DEFAULT_WINDOWS),
                        help="CT windows, one channel each: preset names or LEVEL:WIDTH, comma separated")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True)

    p = kinds.add_parser("folder", help="a class per folder")
    p.add_argument("root", help="a local folder or a gs:// or s3:// prefix")
    _modality(p)
    _common(p)

    p = kinds.add_parser("csv", help="a CSV manifest")
    p.add_argument("csv", help="a local file or a gs:// or s3:// URL")
    p.add_argument("--root", help="base of relative paths (default: the CSV's folder)")
    p.add_argument("--path-column", default="path")
    p.add_argument("--path-format", default="{}", help='e.g. "images/{}.jpg" for bare names')
    p.add_argument("--label-column", default="label")
    p.add_argument("--multi-label", action="store_true")
    p.add_argument("--label-sep", default="|")
    p.add_argument("--none-value", help='label value meaning "no label", e.g. "No Finding"')
    p.add_argument("--label-names", help="comma-separated label names, in index order (default: sorted)")
    p.add_argument("--split-column")
    p.add_argument("--patient-column")
    _modality(p)
    _common(p)

    p = kinds.add_parser("medmnist", help="MedMNIST npz files; one dataset per file, named after it")
    p.add_argument("npz", nargs="+", help="local files or gs:// or s3:// URLs")
    _common(p, dataset_required=False)

    p = kinds.add_parser("dicom", help="a folder of DICOM files")
    p.add_argument("root", help="a local folder or a gs:// or s3:// prefix")
    p.add_argument("--frame-stride", type=int, default=1)
    _modality(p)
    _windows(p)
    _common(p)

    p = kinds.add_parser("nifti", help="NIfTI CT volumes (a file or a folder)")
    p.add_argument("root", help="a file or folder, local or a gs:// or s3:// URL")
    p.add_argument("--slice-stride", type=int, default=1)
    _windows(p)
    _common(p)

    p = kinds.add_parser("demo", help="synthetic images of all seven modalities")
    p.add_argument("--out", required=True, help="output root, a local path or a gs:// or s3:// URL")
    p.add_argument("--images-per-modality", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    _runner(p)

    p = kinds.add_parser("new-key", help="create a random id key file")
    p.add_argument("path", help="a local path or a gs:// or s3:// URL")

    return parser


def make_source(args: argparse.Namespace) -> Source:
    if args.kind == "folder":
        return ImageFolderSource(args.root, modality=args.modality, channels=args.channels)
    if args.kind == "csv":
        return CsvSource(
            args.csv, modality=args.modality, root=args.root, path_column=args.path_column,
            path_format=args.path_format, label_column=args.label_column, multi_label=args.multi_label,
            label_sep=args.label_sep, none_value=args.none_value,
            label_names=args.label_names.split(",") if args.label_names else None,
            split_column=args.split_column, patient_column=args.patient_column, channels=args.channels,
        )
    if args.kind == "dicom":
        return DicomSource(args.root, modality=args.modality, windows=args.windows, channels=args.channels,
                           frame_stride=args.frame_stride)
    if args.kind == "nifti":
        return NiftiSource(args.root, windows=args.windows, slice_stride=args.slice_stride)
    raise ValueError(f"no single source for kind {args.kind!r}")


# Each kind's arguments naming what it reads: the places a cluster's workers must reach.
INPUTS = {"folder": ("root",), "csv": ("csv", "--root"), "medmnist": ("npz",), "dicom": ("root",),
          "nifti": ("root",), "demo": ()}


def locations(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(argument, location or None when not given) of every input, the output and the key file."""
    found: list[tuple[str, str | None]] = []
    for argument in INPUTS[args.kind]:
        value = getattr(args, argument.lstrip("-").replace("-", "_"))
        found += [(argument, v) for v in value] if isinstance(value, list) else [(argument, value)]
    found.append(("--out", args.out))
    if args.kind != "demo":
        found.append(("--id-key-file", args.id_key_file))
    return found


def _options(args: argparse.Namespace, dataset: str) -> ConvertOptions:
    return ConvertOptions(
        dataset=dataset, out_dir=args.out, shard_size=args.shard_size, workers=args.workers,
        skip_bad=args.skip_bad, fractions=args.splits, seed=args.seed, progress=not args.no_progress,
        overwrite=args.overwrite,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.kind == "new-key":
        print(f"wrote a new id key to {privacy.new_key_file(args.path)}")
        return 0
    try:
        beam_options = _beam_options(args) if args.runner == "beam" else None
        if args.kind == "demo":
            if beam_options is not None:
                jobs = demo_jobs(args.out, args.images_per_modality, args.size, args.seed,
                                 shard_size=args.shard_size, workers=args.workers)
                _run_beam(jobs, functools.partial(demo_key, args.seed), beam_options)
                return 0
            for m in write_demo_data(args.out, args.images_per_modality, args.size, args.seed,
                                     shard_size=args.shard_size, workers=args.workers):
                print(f"{m.dataset}: " + ", ".join(f"{s} {m.splits[s].num_records}" for s in m.splits))
            return 0
        privacy.check_key_outside(args.id_key_file, args.out)
        key = privacy.load_key(args.id_key_file)
        if args.kind == "medmnist":
            if args.dataset and len(args.npz) > 1:
                parser.error("--dataset names one dataset; give one npz file or leave --dataset out")
            jobs = [(MedMnistSource(p), args.dataset or storage.path(p).name.removesuffix(".npz")) for p in args.npz]
        else:
            jobs = [(make_source(args), args.dataset)]
        if beam_options is not None:
            # Workers read the key themselves, from the same file (or their $MERMED_ID_KEY).
            key_file = args.id_key_file
            if key_file is not None and not storage.is_remote(key_file):
                key_file = os.path.abspath(key_file)
            _run_beam([(source, _options(args, dataset)) for source, dataset in jobs],
                      functools.partial(privacy.load_key, key_file), beam_options)
            return 0
        for source, dataset in jobs:
            print(convert(source, key, _options(args, dataset)).summary())
    except OSError as e:  # an unwritable or full output, an unreadable source folder
        print(f"error: {_os_error_message(e, args)}", file=sys.stderr)
        return 1
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _beam_module() -> ModuleType:
    """data_pipelines.beam_convert, or one line saying how to install Beam when it is missing."""
    try:
        from data_pipelines import beam_convert  # noqa: PLC0415 - Beam is optional
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("apache_beam"):
            raise
        raise ConversionError("--runner=beam needs Apache Beam, which is not installed: "
                              "pip install -r requirements-beam.txt (or pip install 'mermed-jax[beam]')") from None
    return beam_convert


def _beam_options(args: argparse.Namespace) -> PipelineOptions:
    """Beam's options of a --runner=beam command, checked before anything is read: a flag Beam does
    not know, or a location the runner's workers cannot reach, is refused by name."""
    beam_convert = _beam_module()
    options = beam_convert.pipeline_options(shlex.split(args.beam_options), args.workers)
    beam_convert.check_locations(options, locations(args))
    return options


def _run_beam(jobs: list[tuple[Source, ConvertOptions]], load_key: Callable[[], bytes],
              options: PipelineOptions) -> None:
    """Converts every job in one Beam pipeline; prints each dataset's summary and Beam counters."""
    done = _beam_module().run(jobs, load_key, options)
    for report in done.reports:
        counted = done.counters.get(report.manifest.dataset, {})
        print(report.summary())
        print("  beam counters: " + ", ".join(f"{name} {value}" for name, value in sorted(counted.items())))


def _os_error_message(error: OSError, args: argparse.Namespace) -> str:
    """The error, naming its path unless that path is in a DICOM/NIfTI source, where folder and
    file names may name patients."""
    path = pathlib.Path(os.fsdecode(error.filename)).absolute() if error.filename is not None else None
    private = args.kind in ("dicom", "nifti")
    if path is None or not private:
        return str(error)
    out = pathlib.Path(args.out).absolute()
    if path == out or out in path.parents:
        return str(error)
    return f"{error.strerror} (a path in the source; not shown, as DICOM/NIfTI paths may name patients)"


if __name__ == "__main__":
    sys.exit(main())
