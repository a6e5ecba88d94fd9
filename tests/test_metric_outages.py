"""A storage outage during a run: metric and TensorBoard flushes and profiler trace copies that
fail are logged and retried later instead of killing training; only the end of the job raises.
Also: `evaluate --watch` takes process 0's list of checkpoint steps on every host."""

import logging
import os

import numpy as np
import pytest

from data_pipelines import storage
from mermed_jax import evaluate
from mermed_jax.training import metric_writers, profiling


def _steps(location) -> list[int]:
    return [r["step"] for r in metric_writers.read_metrics(location)]


def test_a_failed_flush_warns_keeps_its_records_and_a_later_flush_writes_them(gcs_bucket, object_stores, monkeypatch,
                                                                               caplog):
    monkeypatch.setattr(metric_writers, "PART_RECORDS", 3)
    run = f"{gcs_bucket}/run"
    writer = metric_writers.make_writer(run, start_step=0, flush_seconds=3600)
    for step in (1, 2):
        writer.write_scalars(step, {"loss": float(step)})
    object_stores.proxy.deny = True  # answers 403: the storage layer gives up at once
    with caplog.at_level(logging.WARNING):
        writer.flush()
        for step in (3, 4, 5):  # step 4 fills the first part: its flush fails too, and keeps it
            writer.write_scalars(step, {"loss": float(step)})
    warnings = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
    assert any(f"{run}/metrics/000000000001.jsonl" in w and "access denied" in w for w in warnings), warnings
    assert any(f"{run}/events.out.tfevents.000000000001.mermed" in w for w in warnings), warnings
    object_stores.proxy.clear()
    assert _steps(run) == []  # nothing reached the bucket
    writer.flush()
    assert _steps(run) == [1, 2, 3, 4, 5]
    assert storage.listdir(f"{run}/metrics") == ["000000000001.jsonl", "000000000004.jsonl"]
    events = sorted(n for n in storage.listdir(run) if n.startswith(metric_writers.EVENTS_PREFIX))
    assert events == ["events.out.tfevents.000000000001.mermed", "events.out.tfevents.000000000004.mermed"]

    # At the end of the job the error is raised, after both streams tried.
    writer.write_scalars(6, {"loss": 6.0})
    events_writer = writer._writers[2]
    tried = []
    events_writer.close = lambda: tried.append(True) or type(events_writer).close(events_writer)
    object_stores.proxy.deny = True
    with pytest.raises(storage.StorageError, match="000000000004.jsonl: writing failed: access denied"):
        writer.close()
    object_stores.proxy.clear()
    assert tried  # the events part was tried after the metrics part failed


def test_a_failed_trace_copy_is_logged_kept_and_copied_with_the_next(gcs_bucket, object_stores, monkeypatch, caplog):
    monkeypatch.setattr(profiling.periodic_actions.Profile, "_end_session", lambda self, url: None)
    run = f"{gcs_bucket}/run"
    hook = profiling.WorkdirProfile(run, num_profile_steps=1, every_steps=10, first_profile=10, profile_duration_ms=None)
    trace = os.path.join(hook._local, "plugins", "profile", "first", "host.xplane.pb")
    os.makedirs(os.path.dirname(trace))
    with open(trace, "wb") as f:
        f.write(b"trace")
    object_stores.proxy.deny = True
    with caplog.at_level(logging.WARNING):
        hook._end_session(None)
    object_stores.proxy.clear()
    assert any("traces not copied" in r.getMessage() and "access denied" in r.getMessage() for r in caplog.records)
    assert os.path.exists(trace)
    hook._end_session(None)
    assert storage.read_bytes(f"{run}/plugins/profile/first/host.xplane.pb") == b"trace"
    assert not os.path.exists(trace)


def test_watch_takes_the_steps_process_0_listed(monkeypatch):
    """Two hosts simulated in turn: process 0 lists and broadcasts; process 1 never lists."""
    sent: list[np.ndarray] = []

    def broadcast(value):
        value = np.asarray(value)
        if evaluate.jax.process_index() == 0:
            sent.append(value)
            return value
        source = sent.pop(0)
        assert source.shape == value.shape and source.dtype == value.dtype  # the collective's contract
        return source

    monkeypatch.setattr(evaluate.multihost_utils, "broadcast_one_to_all", broadcast)
    monkeypatch.setattr(evaluate.jax, "process_count", lambda: 2)
    monkeypatch.setattr(evaluate.jax, "process_index", lambda: 0)
    assert evaluate._from_process_0([0, 5, 10]) == [0, 5, 10]
    assert evaluate._from_process_0([1]) == [1]
    monkeypatch.setattr(evaluate.jax, "process_index", lambda: 1)
    assert evaluate._from_process_0([0]) == [0, 5, 10]  # process 1's own list is ignored
    assert evaluate._from_process_0([0, 7]) == [1]
    assert not sent

    listed = []
    evaluated = []
    monkeypatch.setattr(evaluate.encoders_lib, "checkpoint_steps", lambda workdir: listed.append(workdir) or [5])
    monkeypatch.setattr(evaluate.encoders_lib, "from_checkpoint", lambda workdir, step, normalization: step)
    monkeypatch.setattr(evaluate, "evaluate", lambda config, encoders, eval_dir: evaluated.extend(encoders) or "")
    replies = iter([[0, 5, 10], [0, 5, 10], [1]])  # what process 0 broadcasts at each poll
    monkeypatch.setattr(evaluate, "_from_process_0", lambda values: next(replies))
    config = evaluate.ml_collections.ConfigDict({"watch": {"idle_timeout_seconds": 3600.0, "poll_seconds": 0.0},
                                                 "normalization": None})
    evaluate.watch(config, "gs://bucket/run", "/tmp/unused")
    assert evaluated == [5, 10] and listed == []  # each step once; process 1 listed nothing
