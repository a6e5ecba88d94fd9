"""Dataset conversion on Apache Beam: the local converter's plan and shard writer as one pipeline.

`python -m data_pipelines.convert <kind> ... --runner=beam` runs this on Beam's local runner (worker
processes on this machine) or, through --beam-options, on Dataflow, Flink or Spark (docs/beam.md).
Each dataset is one branch of the pipeline:

    list units (one worker: folder walk, CSV rows, npz labels, DICOM file paths)
    -> spread -> item of each unit (DICOM: its header read, on every worker)
    -> gather -> plan (shard_writer.plan_shards on the whole listing, as the local converter does,
       so splits and the permutation are fixed before anything is decoded and a skipped input
       never moves another; shard_writer.begin: the plan's fingerprint, refusal to mix plans)
    -> spread -> write each shard (shard_writer.write_shard, then its completion marker; a shard
       whose marker an earlier run left, complete, is kept: shard_writer.kept_shard)
    -> gather -> manifest.json (shard_writer.build_manifest, results in plan order), after every shard.

So the files written are the local converter's, byte for byte; `convert.py`'s local and Beam runs
of one command give the same dataset, and either resumes the other's.

Privacy on a cluster, where the runner uploads the job graph, the options and staged files: the
graph holds no source location, listed input path, DICOM value, image id or key. Each branch's
job (the source object, which holds the input locations, and the options) is pickled and
encrypted (AES-256-GCM, `seal`) under a key derived from the id key, and the graph carries only
that ciphertext and how to get the key (the key-file location, or the demo seed). Workers read
the key in DoFn.setup (privacy.load_key: the key file, local or a bucket URL, else
$MERMED_ID_KEY in the worker's environment) and decrypt their job there. Listed paths, UIDs and
patient ids travel only as pipeline data, between workers, as the local converter passes them to
its processes; nothing of this pipeline writes to the runner's temp or staging locations.
Counters (Beam metrics) carry counts and skip reasons, never ids. Errors are the local
converter's: a private source's name the item by its hashed id only, without the chained cause.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult, PipelineState
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # a dependency of Beam itself

from data_pipelines import manifest as mf
from data_pipelines import privacy
from data_pipelines import shard_writer as sw
from data_pipelines import storage
from data_pipelines.sources.base import Item, Source

KeyLoader = Callable[[], bytes]  # how a worker gets the HMAC key: pickled into the graph, run at setup
Job = tuple[Source, sw.ConvertOptions]
# Runners of worker processes on this machine, which take --direct_num_workers (the DirectRunner
# runs batch pipelines on the FnApiRunner).
_LOCAL_RUNNERS = ("DirectRunner", "SwitchingDirectRunner", "TestDirectRunner", "FnApiRunner")
_DATAFLOW_RUNNERS = ("DataflowRunner", "TestDataflowRunner")
_NAMESPACE = "mermed/"  # + dataset: the namespace of a dataset's counters
KEPT = "shards kept"  # the counter of shards an earlier run completed
_SEAL_CONTEXT = b"mermed-jax beam job v1"  # derives the job's cipher key from the id key; its associated data
_NONCE_BYTES = 12


def runner_name(options: PipelineOptions) -> str | None:
    """The runner's class name as Beam resolves --runner (create_runner: any case, "Runner" optional,
    or a dotted path), e.g. DataflowRunner for dataflow; None when the options name none."""
    runner = options.view_as(StandardOptions).runner
    if runner is None:
        return None
    if not isinstance(runner, str):  # a runner object
        return type(runner).__name__
    known = {name.lower(): name for name in StandardOptions.KNOWN_RUNNER_NAMES}
    lowered = runner.lower()
    return known.get(lowered) or known.get(lowered + "runner") or runner.rsplit(".", 1)[-1]


def unknown_flags(flags: Sequence[str]) -> list[str]:
    """What of `flags` no Beam option takes (Beam itself only logs "Discarding unparseable args"
    and runs without them), parsed as Beam parses them."""
    unknown: list[str] = []
    PipelineOptions(list(flags)).get_all_options(
        retain_unknown_options=True,  # so Beam logs nothing of its own here
        add_extra_args_fn=lambda parser: unknown.extend(parser.parse_known_args(list(flags))[1]))
    return unknown


def pipeline_options(flags: Sequence[str], workers: int) -> PipelineOptions:
    """Beam's options from --beam-options' flags only (never this process's argv, which names the
    source); on this machine `workers` worker processes unless the flags say otherwise. A flag Beam
    does not know (a typo Beam would drop) is refused, named.

    Without a runner in the flags: the FnApiRunner, which the DirectRunner runs batch pipelines on.
    The DirectRunner itself first tries Prism, a binary it downloads at run time (here it cannot,
    and falls back), which by default runs the workers inside this process instead."""
    flags = list(flags)
    unknown = unknown_flags(flags)
    if unknown:
        raise sw.ConversionError(f"--beam-options: {' '.join(unknown)}: not a Beam pipeline option (Beam would "
                                 "drop it and run without it); check its spelling in Beam's pipeline options")
    options = PipelineOptions(flags)
    runner = runner_name(options)
    if runner is None:
        flags = ["--runner=FnApiRunner", *flags]
    if runner is None or runner in _LOCAL_RUNNERS:
        flags = [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing", *flags]
    return PipelineOptions(flags)


def check_locations(options: PipelineOptions, locations: Sequence[tuple[str, str | None]]) -> None:
    """On Dataflow, whose workers share no disk with this machine, refuses a local input, output or
    key file, and a key left to $MERMED_ID_KEY (not in the workers' environment), naming the flag,
    before the job is submitted. `locations`: (flag, location or None when not given)."""
    if runner_name(options) not in _DATAFLOW_RUNNERS:
        return
    if ("--id-key-file", None) in locations:
        raise sw.ConversionError("on Dataflow the workers read the id key from --id-key-file: give a gs:// URL "
                                 f"(${privacy.KEY_ENV} is not in their environment)")
    local = [f"{flag} {location}" for flag, location in locations
             if location is not None and not storage.is_remote(location)]
    if len(local) == 1:
        raise sw.ConversionError(f"{local[0]}: a local path, which Dataflow's workers cannot reach; give a gs:// URL")
    if local:
        raise sw.ConversionError(f"{', '.join(local)}: local paths, which Dataflow's workers cannot reach; "
                                 "give gs:// URLs")


def _cipher(key: bytes) -> AESGCM:
    return AESGCM(hmac.new(key, _SEAL_CONTEXT, hashlib.sha256).digest())


def seal(job: Job, key: bytes) -> bytes:
    """The job pickled and encrypted under a key derived from the id key: what the graph carries
    instead of the source object, whose input locations may name patients."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + _cipher(key).encrypt(nonce, pickle.dumps(job), _SEAL_CONTEXT)


def unseal(sealed: bytes, key: bytes) -> Job:
    """The job `seal` encrypted; a worker whose key is not the launcher's is refused."""
    try:
        plain = _cipher(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], _SEAL_CONTEXT)
    except InvalidTag:
        raise sw.ConversionError("the worker's id key is not the one the job was launched with (the job does not "
                                 f"decrypt): give the workers the same --id-key-file or ${privacy.KEY_ENV}") from None
    return pickle.loads(plain)


def _counter(dataset: str, name: str) -> Any:
    return Metrics.counter(_NAMESPACE + dataset, name)


class _Job(beam.DoFn):
    """A step of one dataset's conversion: it holds the sealed job and how to get the key (both
    pickled into the graph), and reads the key and opens the job on the worker, at setup."""

    def __init__(self, sealed: bytes, load_key: KeyLoader):
        self._sealed, self._load_key = sealed, load_key

    def setup(self) -> None:
        self._key = self._load_key()
        self._source, self._options = unseal(self._sealed, self._key)


class _List(_Job):
    """The source's units, numbered in listing order (one worker: a folder walk, CSV rows, ...)."""

    def process(self, _: None) -> Iterator[tuple[int, Any]]:
        yield from enumerate(self._source.units())


class _ItemOf(_Job):
    """A numbered unit -> its numbered item (DICOM: its header read)."""

    def process(self, indexed: tuple[int, Any]) -> Iterator[tuple[int, Item]]:
        index, unit = indexed
        yield index, self._source.item(unit)


class _Plan(_Job):
    """The whole listing -> the plan's shard tasks with their positions, the output readied for them."""

    def process(self, listing: list[tuple[int, Item]]) -> Iterator[tuple[int, sw.ShardTask]]:
        items = [item for _, item in sorted(listing, key=lambda pair: pair[0])]
        if not items:
            raise sw.ConversionError(f"{self._source.__class__.__name__}: no inputs found")
        tasks = sw.plan_shards(items, self._options)
        sw.begin(self._options.directory, sw.fingerprint(self._source, tasks, self._key, self._options),
                 self._options.overwrite)
        _counter(self._options.dataset, "inputs listed").inc(len(items))
        yield from enumerate(tasks)


class _WriteShard(_Job):
    """One planned shard: kept when an earlier run completed it, else written, then marked complete."""

    def process(self, planned: tuple[int, sw.ShardTask]) -> Iterator[tuple[int, sw.ShardResult]]:
        position, task = planned
        directory, dataset = self._options.directory, self._options.dataset
        result = sw.kept_shard(directory, task.name)
        if result is not None:
            _counter(dataset, KEPT).inc()
        else:
            result = sw.write_shard(self._source, self._key, self._options, task)
            sw.write_marker(directory, result)
            _counter(dataset, "shards written").inc()
            _counter(dataset, "records written").inc(result.num_records)
            for reason, _ in result.skipped:
                _counter(dataset, f"skipped: {reason}").inc()
        yield position, result


class _WriteManifest(_Job):
    """Every shard's result -> manifest.json, the results in plan order."""

    def process(self, results: list[tuple[int, sw.ShardResult]]) -> Iterator[None]:
        ordered = [result for _, result in sorted(results, key=lambda pair: pair[0])]
        mf.save_manifest(sw.build_manifest(self._source, self._options, ordered), self._options.directory)
        yield from ()


def add_conversion(pipeline: beam.Pipeline, job: Job, key: bytes, load_key: KeyLoader) -> None:
    """The branch converting a job's source into its options.directory (see module docstring);
    `key` seals the job, which the workers open with the key `load_key` gives them."""
    sealed = seal(job, key)
    name = job[1].dataset
    listing = (
        pipeline
        | f"{name}: start" >> beam.Create([None])
        | f"{name}: list" >> beam.ParDo(_List(sealed, load_key))
        | f"{name}: spread units" >> beam.Reshuffle()
        | f"{name}: item of each unit" >> beam.ParDo(_ItemOf(sealed, load_key))
        | f"{name}: gather listing" >> beam.combiners.ToList()
    )
    (
        listing
        | f"{name}: plan" >> beam.ParDo(_Plan(sealed, load_key))
        | f"{name}: spread shards" >> beam.Reshuffle()
        | f"{name}: write shards" >> beam.ParDo(_WriteShard(sealed, load_key))
        | f"{name}: gather results" >> beam.combiners.ToList()
        | f"{name}: write manifest" >> beam.ParDo(_WriteManifest(sealed, load_key))
    )


def build(jobs: Sequence[Job], load_key: KeyLoader, options: PipelineOptions) -> beam.Pipeline:
    """A pipeline converting every job, not yet run (its graph is what a runner uploads). The key
    is read here once, to seal the jobs."""
    pipeline = beam.Pipeline(options=options)
    key = load_key()
    for job in jobs:
        add_conversion(pipeline, job, key, load_key)
    return pipeline


@dataclasses.dataclass(frozen=True)
class BeamRun:
    reports: list[sw.ConversionReport]
    counters: dict[str, dict[str, int]]  # per dataset: counter name -> value


def counters(result: PipelineResult) -> dict[str, dict[str, int]]:
    """This package's Beam counters per dataset (committed values where the runner gives them)."""
    found: dict[str, dict[str, int]] = {}
    for counter in result.metrics().query(MetricsFilter())["counters"]:
        namespace = counter.key.metric.namespace
        if namespace.startswith(_NAMESPACE):
            value = counter.committed if counter.committed is not None else counter.attempted
            per_dataset = found.setdefault(namespace.removeprefix(_NAMESPACE), {})
            per_dataset[counter.key.metric.name] = per_dataset.get(counter.key.metric.name, 0) + value
    return found


def _report(options: sw.ConvertOptions, kept: int) -> sw.ConversionReport:
    """The local converter's report of a finished dataset, read from what the pipeline wrote."""
    manifest = mf.load_manifest(options.directory)
    names = [shard.file for split in manifest.splits.values() for shard in split.shards]
    return sw.report(manifest, sw.read_markers(options.directory, names), kept)


def run(jobs: Sequence[Job], load_key: KeyLoader, options: PipelineOptions) -> BeamRun:
    """Runs the conversion pipeline to the end; ConversionError with the first worker's reason when
    it fails (a bad input without skipping, a conflicting output, a worker that died)."""
    pipeline = build(jobs, load_key, options)
    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    except Exception as e:  # noqa: BLE001 - runners wrap a worker's error in their own types
        raise sw.ConversionError(f"the Beam pipeline failed: {reason(e)}") from e
    if state != PipelineState.DONE:
        raise sw.ConversionError(f"the Beam pipeline ended in state {state}")
    found = counters(result)
    return BeamRun(
        reports=[_report(o, found.get(o.dataset, {}).get(KEPT, 0)) for _, o in jobs],
        counters=found,
    )


# The converter's message in a worker's traceback, less the step Beam appends to it.
_STEP = r"(?: \[while running '[^']*'\])?$"
_CONVERSION_ERROR = re.compile(r"ConversionError: (.*?)" + _STEP, re.MULTILINE)


def reason(error: BaseException) -> str:
    """The converter's own message inside a runner's error (its text carries the worker's traceback;
    a runner working in this process raises the worker's error itself, the step appended), else the
    error's first line."""
    if isinstance(error, sw.ConversionError):
        return re.sub(_STEP, "", str(error).strip().splitlines()[0]).strip()
    found = _CONVERSION_ERROR.findall(str(error))
    return found[-1].strip() if found else storage.first_line(error)
