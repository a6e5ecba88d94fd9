"""Training and evaluation pipelines on tiny synthetic shards: resume, balance, sharding, bad input."""
from __future__ import annotations

import collections
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from repo import ROOT

from data_pipelines import (
    eval_pipeline,
    manifest,
    normalization,
    record_source,
    records,
    sampler,
    stats,
)
from data_pipelines.manifest import load_manifest
from data_pipelines.modalities import NUM_MODALITIES, modality_id
from data_pipelines.multicrop import MultiCropConfig
from data_pipelines.pipeline import TrainConfig, train_iterator
from mermed_jax.recipe import schema
from mermed_jax.sharding import to_global

TINY = MultiCropConfig(global_size=16, local_size=8, num_local=2)


def _png(rng: np.random.Generator, value: int) -> bytes:
    image = np.full((12, 10, 3), value, np.uint8)
    image[..., 1] = rng.integers(0, 255, (12, 10), dtype=np.uint8)
    return records.encode_png(image)


def write_dataset(root: pathlib.Path, name: str, modality: str, shard_sizes: list[int], *,
                  split: str = "train", labels=lambda i: [i % 3], corrupt: dict[tuple[int, int], bytes] = None,
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> pathlib.Path:
    """A converted dataset dir: PNG records whose red channel encodes (modality, running index)."""
    directory = root / name
    directory.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    shards, index = [], 0
    for s, size in enumerate(shard_sizes):
        payloads = []
        for r in range(size):
            image = (corrupt or {}).get((s, r)) or _png(rng, index % 256)
            payloads.append(records.encode_example(
                image=image, image_format="png", height=12, width=10, channels=3, modality=modality,
                labels=labels(index), dataset=name, image_id=f"{name}-{index}"))
            index += 1
        file = manifest.shard_name(split, s, len(shard_sizes), "tfrecord")
        records.write_tfrecords(directory / file, payloads)
        shards.append(manifest.Shard(file, size, manifest.file_sha256(directory / file)))
    split_info = manifest.Split(tuple(shards), index, (0, 0, 0), tuple(mean), tuple(std))
    manifest.save_manifest(manifest.Manifest(
        dataset=name, modality=modality, format="tfrecord", label_names=("a", "b", "c"), multi_label=True,
        pixel_depth=8, channels=3, feature_spec=records.FEATURE_SPEC, splits={split: split_info}), directory)
    return directory


@pytest.fixture(scope="module")
def three_modalities(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("data")
    return [str(write_dataset(root, "ctset", "ct", [7, 5, 6])),
            str(write_dataset(root, "cxrset", "cxr", [4, 4])),
            str(write_dataset(root, "dermset", "derm", [3]))]


def _cfg(dirs, **kw) -> TrainConfig:
    defaults = dict(crops=TINY, read_threads=0, prefetch=1, shuffle_window=4, cycle_length=2, per_device_batch=4)
    return TrainConfig(dirs=tuple(dirs), **{**defaults, **kw})


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout(three_modalities):
    it = train_iterator(_cfg(three_modalities), process_index=0, process_count=1, local_devices=2)
    batch = next(it)
    assert set(batch) == {"global", "local", "modality"}
    assert batch["global"].shape == (8, 2, 16, 16, 3) and batch["global"].dtype == np.uint8
    assert batch["local"].shape == (8, 2, 8, 8, 3) and batch["local"].dtype == np.uint8
    assert batch["modality"].dtype == np.int32
    assert set(batch["modality"]) <= {modality_id(m) for m in ("ct", "cxr", "derm")}


def test_resume_continues_exactly(three_modalities):
    cfg = _cfg(three_modalities)
    host = dict(process_index=0, process_count=1, local_devices=2)
    reference = _take(train_iterator(cfg, **host), 9)
    first = train_iterator(cfg, **host)
    _take(first, 4)
    state = first.get_state()
    restored = train_iterator(cfg, **host)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 5), reference[4:])


def test_resume_with_worker_processes(three_modalities):
    # Worker processes change neither the batches nor the state: save with 2, restore with 1.
    host = dict(process_index=0, process_count=1, local_devices=1)
    reference = _take(train_iterator(_cfg(three_modalities), **host), 5)
    first = train_iterator(_cfg(three_modalities, worker_count=2), **host)
    _assert_batches_equal(_take(first, 2), reference[:2])
    state = first.get_state()
    first.close()
    restored = train_iterator(_cfg(three_modalities, worker_count=1), **host)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 3), reference[2:])
    restored.close()


def test_per_device_counts_equal_with_rotating_remainder(three_modalities):
    # b = 4 over 3 modalities: each device batch holds 1 of each plus one extra that rotates.
    it = train_iterator(_cfg(three_modalities), process_index=0, process_count=1, local_devices=2)
    extras = collections.Counter()
    for batch in _take(it, 6):
        for device_rows in batch["modality"].reshape(2, 4):
            counts = collections.Counter(device_rows.tolist())
            assert sorted(counts) == sorted(modality_id(m) for m in ("ct", "cxr", "derm"))
            assert sorted(counts.values()) == [1, 1, 2]
            extras.update(m for m, c in counts.items() if c == 2)
    assert sorted(extras.values()) == [4, 4, 4]  # 12 device batches, extras spread evenly


def test_small_device_batch_is_balanced_per_host():
    alloc = sampler.BalancedAllocator(per_device_batch=2, local_devices=4, process_index=1,
                                      process_count=2, weights=np.ones(7))
    for step in range(20):
        per_host = alloc.device_counts(step).sum(axis=0)
        assert per_host.sum() == 8 and per_host.max() - per_host.min() <= 1
        assert (alloc.device_counts(step).sum(axis=1) == 2).all()


def test_global_batch_balanced_across_hosts():
    hosts = [sampler.BalancedAllocator(5, 2, p, 3, np.ones(NUM_MODALITIES)) for p in range(3)]
    for step in range(12):
        total = sum(h.device_counts(step).sum(axis=0) for h in hosts)
        assert total.sum() == 30 and total.max() - total.min() <= 1


def test_stream_start_matches_running_sum():
    alloc = sampler.BalancedAllocator(7, 3, 1, 4, np.array([0.5, 0.3, 0.2]))
    running = np.zeros(3, np.int64)
    for step in range(300):
        np.testing.assert_array_equal(alloc.stream_start(step), running)
        running += alloc.device_counts(step).sum(axis=0)
    # Mixture weights: shares follow the weights.
    np.testing.assert_allclose(running / running.sum(), [0.5, 0.3, 0.2], atol=0.01)


def test_mixture_weights_in_batches(three_modalities):
    cfg = _cfg(three_modalities, per_device_batch=8, mixture={"ct": 0.5, "cxr": 0.5})
    batch = next(train_iterator(cfg, process_index=0, process_count=1, local_devices=1))
    assert collections.Counter(batch["modality"].tolist()) == {modality_id("ct"): 4, modality_id("cxr"): 4}


def test_natural_mixture_follows_the_record_counts(three_modalities):
    """data.mixture="natural" (the ablation of balanced batches): 18 CT, 8 CXR, 3 derm records."""
    cfg = _cfg(three_modalities, per_device_batch=29, mixture="natural")
    batch = next(train_iterator(cfg, process_index=0, process_count=1, local_devices=1))
    assert collections.Counter(batch["modality"].tolist()) == {
        modality_id("ct"): 18, modality_id("cxr"): 8, modality_id("derm"): 3}
    with pytest.raises(ValueError, match="data.mixture='nature'"):
        _cfg(three_modalities, mixture="nature")


def test_mixture_naming_absent_modality_fails(three_modalities):
    with pytest.raises(ValueError, match="oct"):
        train_iterator(_cfg(three_modalities, mixture={"oct": 1.0}), process_index=0, process_count=1,
                       local_devices=1)


def _record_set(h: record_source.HostRecords) -> set[tuple[str, int]]:
    return {(h.files[f], int(o)) for f, o in zip(h.file_ids, h.offsets)}


def test_hosts_read_disjoint_files_covering_all(tmp_path):
    write_dataset(tmp_path, "d", "path", [3, 2, 4, 1])
    shards = record_source.list_shards([tmp_path / "d"], "train")[modality_id("path")]
    hosts = [record_source.host_records(shards, p, 2) for p in range(2)]
    files = [set(h.files) for h in hosts]
    assert files[0].isdisjoint(files[1]) and files[0] | files[1] == {s.path for s in shards}
    assert sum(len(h) for h in hosts) == 10


def test_record_level_fallback_when_files_fewer_than_hosts(tmp_path):
    write_dataset(tmp_path, "d", "us", [5, 4])
    shards = record_source.list_shards([tmp_path / "d"], "train")[modality_id("us")]
    hosts = [record_source.host_records(shards, p, 3) for p in range(3)]
    sets = [_record_set(h) for h in hosts]
    assert all(len(s) == 3 for s in sets)  # nobody idles
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    everything = {(s.path, int(o)) for s in shards for o in records.index_records(s.path)}
    assert sets[0] | sets[1] | sets[2] == everything


def test_two_hosts_split_every_modality(three_modalities):
    # 3, 2 and 1 files over 2 hosts: file-level, file-level, record-level.
    shards = record_source.list_shards(three_modalities, "train")
    for m, files in shards.items():
        hosts = [_record_set(record_source.host_records(files, p, 2)) for p in range(2)]
        assert not hosts[0] & hosts[1]
        assert len(hosts[0] | hosts[1]) == sum(f.num_records for f in files)


def test_epoch_order_is_a_permutation_and_reshuffles():
    starts = np.array([0, 5, 9, 20, 21])
    a = sampler.epoch_order(starts, 0, 1, 0, 0, cycle_length=2, shuffle_window=3)
    b = sampler.epoch_order(starts, 0, 1, 0, 1, cycle_length=2, shuffle_window=3)
    assert sorted(a) == list(range(21)) and sorted(b) == list(range(21))
    assert not np.array_equal(a, b)


def test_small_modality_cycles_more_often(three_modalities):
    it = train_iterator(_cfg(three_modalities, per_device_batch=6), process_index=0, process_count=1,
                        local_devices=1)
    counts = collections.Counter()
    for batch in _take(it, 3):
        counts.update(batch["modality"].tolist())
    # 3 derm records, 6 derm images drawn: the derm stream has passed over its data twice.
    assert counts[modality_id("derm")] == 6


def _corrupt_dir(tmp_path, modality="ct"):
    # Record 1 of shard 0 holds bytes that are neither PNG nor JPEG.
    return str(write_dataset(tmp_path, "bad", modality, [3], corrupt={(0, 1): b"not an image"}))


def test_bad_image_raises_naming_file_and_offset(tmp_path):
    directory = _corrupt_dir(tmp_path)
    cfg = _cfg([directory], per_device_batch=3, shuffle_window=1)
    offsets = records.index_records(pathlib.Path(directory) / "train-00000-of-00001.tfrecord")
    with pytest.raises(records.CorruptRecordError) as info:
        next(train_iterator(cfg, process_index=0, process_count=1, local_devices=1))
    assert info.value.path.endswith("train-00000-of-00001.tfrecord")
    assert info.value.offset == offsets[1]
    assert str(offsets[1]) in str(info.value)


def test_bad_image_skipped_and_counted(tmp_path):
    cfg = _cfg([_corrupt_dir(tmp_path)], per_device_batch=3, skip_corrupt=True)
    it = train_iterator(cfg, process_index=0, process_count=1, local_devices=1)
    batches = _take(it, 2)
    assert it.metrics()["skipped_records"] == 2  # one bad record, met once per pass
    assert all(b["global"].shape[0] == 3 for b in batches)
    state = it.get_state()
    assert state["skipped_records"] == 2


def test_bad_crc_raises_naming_file_and_offset(tmp_path):
    directory = pathlib.Path(write_dataset(tmp_path, "crc", "cfp", [3]))
    path = directory / "train-00000-of-00001.tfrecord"
    offsets = records.index_records(path)
    data = bytearray(path.read_bytes())
    data[offsets[2] + 20] ^= 0xFF  # inside the payload: the header still indexes
    path.write_bytes(bytes(data))
    cfg = _cfg([str(directory)], per_device_batch=3)
    with pytest.raises(records.CorruptRecordError, match=str(offsets[2])):
        next(train_iterator(cfg, process_index=0, process_count=1, local_devices=1))


def test_config_from_configdict(three_modalities):
    import ml_collections

    section = ml_collections.ConfigDict({
        "dirs": list(three_modalities), "per_device_batch": 3, "seed": 1, "read_threads": 0,
        "crops": {"global_size": 16, "local_size": 8, "num_local": 2, "global_scale": [0.3, 1.0]}})
    cfg = TrainConfig.from_config(section)
    assert cfg.crops.global_scale == (0.3, 1.0) and cfg.dirs == tuple(three_modalities)
    with pytest.raises(ValueError, match="per_devce_batch"):
        TrainConfig.from_config({"dirs": ["x"], "per_devce_batch": 3})
    evaluation = eval_pipeline.EvalConfig.from_config(ml_collections.ConfigDict({"dirs": ["x"], "batch_size": 4}))
    assert evaluation.dirs == ("x",) and evaluation.batch_size == 4
    with pytest.raises(ValueError, match="labels"):
        eval_pipeline.EvalConfig(dirs=("x",), labels="onehot")


def test_config_from_the_paper_recipe(three_modalities):
    config = schema.paper_recipe()
    config.data.dirs = tuple(three_modalities)
    cfg = TrainConfig.from_config(config.data, global_batch=config.global_batch, crops=config.crops)
    assert cfg.crops == MultiCropConfig()  # the recipe's numbers are the augmentation's defaults
    assert cfg.global_batch == 1024 and cfg.mixture is None


def test_to_global_shards_batch_over_devices(three_modalities):
    devices = np.array(jax.devices()[:4])
    target = NamedSharding(Mesh(devices, ("data",)), PartitionSpec("data"))
    batch = next(train_iterator(_cfg(three_modalities), process_index=0, process_count=1, local_devices=4))
    arrays = to_global(batch, target)
    assert arrays["global"].shape == batch["global"].shape
    assert arrays["modality"].sharding == target
    np.testing.assert_array_equal(np.asarray(arrays["local"]), batch["local"])


def test_measured_stats_pool_the_manifests_and_fall_back_to_a_table(three_modalities):
    official_mean, official_std = normalization.table("official")
    mean, std = stats.measured_stats(three_modalities)
    assert mean.shape == std.shape == (NUM_MODALITIES, 3) and mean.dtype == np.float32
    np.testing.assert_allclose(mean[modality_id("ct")], 0.5)
    np.testing.assert_allclose(std[modality_id("derm")], 0.25)
    np.testing.assert_allclose(mean[modality_id("oct")], official_mean[modality_id("oct")])
    mean, _ = stats.measured_stats(three_modalities, fallback="imagenet")
    np.testing.assert_allclose(mean[modality_id("oct")], normalization.IMAGENET[0])
    assert stats.split_size(three_modalities) == sum(
        load_manifest(d).splits["train"].num_records for d in three_modalities)


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval")
    return str(write_dataset(root, "ev", "cxr", [4, 3], split="test", labels=lambda i: [0, 2] if i % 2 else [1]))


def _eval(directory, **kw):
    cfg = eval_pipeline.EvalConfig(dirs=(directory,), split="test", image_size=8, batch_size=3, read_threads=0,
                                   **kw)
    return eval_pipeline.eval_batches(cfg, process_index=0, process_count=1)


def test_eval_one_pass_padded_with_mask(eval_dir):
    batches = list(_eval(eval_dir))
    assert len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 7 + [False] * 2
    labels = np.concatenate([b["labels"] for b in batches])[:7]
    assert labels.shape == (7, 3)
    np.testing.assert_array_equal(labels[0], [0, 1, 0])
    np.testing.assert_array_equal(labels[1], [1, 0, 1])
    assert batches[0]["image"].shape == (3, 8, 8, 3) and batches[0]["image"].dtype == np.uint8
    assert (np.concatenate([b["modality"] for b in batches])[:7] == modality_id("cxr")).all()
    # The red channel carries the record's running index: order is the shards' order, no shuffle.
    red = np.concatenate([b["image"][:, 4, 4, 0] for b in batches])[:7]
    assert red.tolist() == list(range(7))


def test_eval_padded_label_lists(eval_dir):
    labels = np.concatenate([b["labels"] for b in _eval(eval_dir, labels="index")])
    np.testing.assert_array_equal(labels[:2], [[1, -1, -1], [0, 2, -1]])


def test_eval_hosts_split_records(eval_dir):
    seen = []
    for p in range(2):
        cfg = eval_pipeline.EvalConfig(dirs=(eval_dir,), split="test", image_size=8, batch_size=2, read_threads=0)
        batches = list(eval_pipeline.eval_batches(cfg, process_index=p, process_count=2))
        assert len(batches) == 2  # every host runs the same number of steps
        red = np.concatenate([b["image"][:, 4, 4, 0][b["valid"]] for b in batches])
        seen.extend(red.tolist())
    assert sorted(seen) == list(range(7))


def test_eval_bad_record_is_masked_under_skip(tmp_path):
    directory = str(write_dataset(tmp_path, "evbad", "us", [3], split="test", corrupt={(0, 1): b"\x89PNG\r\n\x1a\nbad"}))
    with pytest.raises(records.CorruptRecordError):
        list(_eval(directory))
    batches = list(_eval(directory, skip_corrupt=True))
    assert np.concatenate([b["valid"] for b in batches]).tolist() == [True, False, True]


def _truncate_last_record(directory: str) -> tuple[pathlib.Path, int]:
    path = pathlib.Path(directory) / "train-00000-of-00001.tfrecord"
    last = int(records.index_records(path)[-1])
    path.write_bytes(path.read_bytes()[:last + 20])
    return path, last


def test_truncated_shard_raises_naming_file_and_offset(tmp_path):
    path, last = _truncate_last_record(write_dataset(tmp_path, "cut", "oct", [4]))
    with pytest.raises(records.CorruptRecordError) as info:
        train_iterator(_cfg([str(path.parent)]), process_index=0, process_count=1, local_devices=1)
    assert info.value.path == str(path) and info.value.offset == last


def test_truncated_shard_skipped_and_counted(tmp_path):
    path, _ = _truncate_last_record(write_dataset(tmp_path, "cut", "oct", [4]))
    it = train_iterator(_cfg([str(path.parent)], skip_corrupt=True), process_index=0, process_count=1,
                        local_devices=1)
    assert next(it)["global"].shape[0] == 4
    assert it.metrics() == {"skipped_records": 0, "unreadable_records": 1}


def test_state_saves_through_grain_checkpoint_handler(three_modalities, tmp_path):
    import grain
    from etils import epath

    cfg = _cfg(three_modalities)
    host = dict(process_index=0, process_count=1, local_devices=1)
    reference = _take(train_iterator(cfg, **host), 5)
    first = train_iterator(cfg, **host)
    _take(first, 3)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), first)
    restored = handler.restore(epath.Path(tmp_path), train_iterator(cfg, **host))
    _assert_batches_equal(_take(restored, 2), reference[3:])


_TWO_HOSTS = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from data_pipelines.multicrop import MultiCropConfig
from data_pipelines.pipeline import TrainConfig, train_iterator
from mermed_jax.sharding import to_global
cfg = TrainConfig(dirs=tuple(json.loads(sys.argv[3])), per_device_batch=3, read_threads=0,
                  crops=MultiCropConfig(global_size=16, local_size=8, num_local=2))
it = train_iterator(cfg)  # process index, count and local devices from jax
mesh = Mesh(np.array(jax.devices()), ("data",))
batch = to_global(next(it), NamedSharding(mesh, PartitionSpec("data")))
counts = jax.jit(lambda m: jnp.zeros(7, jnp.int32).at[m].add(1),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))(batch["modality"])
print("RESULT", json.dumps({"shape": list(batch["global"].shape), "counts": np.asarray(counts).tolist()}))
"""


@pytest.mark.multiprocess
def test_two_processes_build_a_balanced_global_batch(three_modalities, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    script = tmp_path / "host.py"
    script.write_text(_TWO_HOSTS)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, str(script), address, str(p), json.dumps(three_modalities)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for p in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT", 1)[1]))
    for r in results:
        assert r["shape"] == [12, 2, 16, 16, 3]  # 2 hosts x 2 devices x 3
        counts = r["counts"]
        assert sum(counts) == 12
        assert [counts[modality_id(m)] for m in ("ct", "cxr", "derm")] == [4, 4, 4]


def test_reads_tfds_prepared_directory(tmp_path):
    # The layout and dataset_info.json fields TFDS 4.9 writes (checked against a real prepare).
    directory = tmp_path / "medmnist_like" / "1.0.0"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s, size in enumerate([3, 2]):
        payloads = [records.encode_example(image=_png(rng, i), image_format="png", height=12, width=10, channels=3,
                                           modality="path", labels=[0], dataset="medmnist_like", image_id=str(i))
                    for i in range(size)]
        records.write_tfrecords(directory / f"medmnist_like-train.tfrecord-{s:05d}-of-00002", payloads)
    (directory / "dataset_info.json").write_text(json.dumps({
        "fileFormat": "tfrecord", "name": "medmnist_like", "version": "1.0.0",
        "splits": [{"filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", "name": "train",
                    "numBytes": "1", "shardLengths": ["3", "2"]}]}))
    shards = record_source.list_shards([directory], "train")
    assert list(shards) == [modality_id("path")] and [f.num_records for f in shards[modality_id("path")]] == [3, 2]
    batch = next(train_iterator(_cfg([str(directory)]), process_index=0, process_count=1, local_devices=1))
    assert (batch["modality"] == modality_id("path")).all()


def test_start_step_equals_skipping_ahead(three_modalities):
    cfg = _cfg(three_modalities)
    host = dict(process_index=0, process_count=1, local_devices=2)
    reference = _take(train_iterator(cfg, **host), 6)
    _assert_batches_equal(_take(train_iterator(cfg, start_step=4, **host), 2), reference[4:])
    assert train_iterator(cfg, start_step=4, **host).get_state()["step"] == 4


def test_threads_do_not_change_batches(three_modalities):
    host = dict(process_index=0, process_count=1, local_devices=2)
    reference = _take(train_iterator(_cfg(three_modalities), **host), 4)
    threaded = train_iterator(_cfg(three_modalities, read_threads=3, prefetch=3), **host)
    _assert_batches_equal(_take(threaded, 4), reference)
    threaded.close()


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 12), devices=st.integers(1, 4), hosts=st.integers(1, 3), modalities=st.integers(1, 7),
       data=st.data())
def test_allocator_properties(b, devices, hosts, modalities, data):
    host = data.draw(st.integers(0, hosts - 1))
    allocs = [sampler.BalancedAllocator(b, devices, p, hosts, np.ones(modalities)) for p in range(hosts)]
    running = np.zeros(modalities, np.int64)
    for step in range(10):
        counts = allocs[host].device_counts(step)
        assert (counts.sum(axis=1) == b).all()
        assert (counts.max(axis=1) - counts.min(axis=1) <= 1).all()  # equal shares, remainder spread
        np.testing.assert_array_equal(allocs[host].stream_start(step), running)
        running += counts.sum(axis=0)
        per_host = counts.sum(axis=0)
        assert per_host.max() - per_host.min() <= 1  # balance per host, also when b < modalities
        pod = sum(a.device_counts(step).sum(axis=0) for a in allocs)
        assert pod.max() - pod.min() <= 1


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=5), hosts=st.integers(1, 4))
def test_host_split_is_a_partition(tmp_path_factory, sizes, hosts):
    root = tmp_path_factory.mktemp("split")
    write_dataset(root, "d", "ct", sizes)
    shards = record_source.list_shards([root / "d"], "train")[modality_id("ct")]
    parts = [_record_set(record_source.host_records(shards, p, hosts)) for p in range(hosts)]
    assert sum(len(p) for p in parts) == sum(sizes)
    assert len(set().union(*parts)) == sum(sizes)
    if len(sizes) % hosts == 0:  # file-level: every file belongs to exactly one host
        files = [{path for path, _ in p} for p in parts]
        assert sum(len(f) for f in files) == len(sizes)


@pytest.mark.realdata
def test_pipeline_on_real_isic_and_nih_shards(realdata, tmp_path):
    from bench.input_pipeline import load_encoded
    from bench.input_pipeline import write_dataset as write_real

    dirs = [str(write_real(load_encoded(realdata, "isic", 8), "derm", tmp_path / "isic")),
            str(write_real(load_encoded(realdata, "nih", 8), "cxr", tmp_path / "nih"))]
    cfg = _cfg(dirs, per_device_batch=3, crops=MultiCropConfig(global_size=64, local_size=32, num_local=2))
    it = train_iterator(cfg, process_index=0, process_count=1, local_devices=2)
    for batch in _take(it, 2):
        assert batch["global"].shape == (6, 2, 64, 64, 3)
        assert sorted(collections.Counter(batch["modality"].tolist()).values()) == [3, 3]
        assert batch["global"].std() > 10  # real content, not blank crops
