"""Configs: the paper's numbers, argument overrides, and validation errors that name the key."""

import jax
import ml_collections
import numpy as np
import pytest
from repo import ROOT

from data_pipelines.manifest import load_manifest
from data_pipelines.sources.synthetic import write_demo_data
from mermed_jax.recipe import derived
from mermed_jax.recipe.arguments import load_config_file
from mermed_jax.recipe.validation import ConfigError, validate_config
from mermed_jax.ssl.schedules import build_schedules


def cfg(name, arg=None):
    return load_config_file(ROOT / "configs" / f"{name}.py", arg)


def test_paper_config_holds_the_recipe():
    c = cfg("mermed_vitb16")
    validate_config(c, devices=jax.devices())
    assert c.model.variant == "B/16" and c.model.drop_path_rate == 0.1 and c.precision == "mixed"
    assert (c.crops.num_global, c.crops.global_size, c.crops.num_local, c.crops.local_size) == (2, 224, 10, 96)
    assert c.global_batch == 1024 and c.epochs == 100 and derived.steps_per_epoch(c) == 3223
    assert (c.memory.size, c.memory.partition_size) == (131_072, 16_384)
    assert (c.head.hidden_dim, c.head.bottleneck_dim, c.head.num_layers, c.head.use_bn) == (2048, 256, 3, True)
    assert (c.loss.student_temp, c.loss.warmup_teacher_temp, c.loss.teacher_temp) == (0.1, 0.04, 0.07)
    assert (c.optim.base_lr, c.optim.min_lr, c.optim.layer_decay, c.optim.clip_grad) == (5e-5, 1e-6, 0.8, 1.0)
    assert (c.optim.weight_decay, c.optim.weight_decay_end, c.ema.momentum) == (0.04, 0.4, 0.9995)
    assert c.init_checkpoint


def test_arguments_override_fields_and_aliases():
    c = cfg("mermed_vitb16", "variant=S/16,batch=512,model.scan_layers=True")
    assert c.model.variant == "S/16" and c.global_batch == 512 and c.model.scan_layers is True
    assert derived.steps_per_epoch(c) == 6446  # derived from the new batch
    with pytest.raises(KeyError, match="unknown key 'model.widht'"):
        cfg("mermed_vitb16", "model.widht=3")


@pytest.mark.parametrize(
    "mutate,devices,key",
    [
        (lambda c: c.model.__setitem__("unknwn", 1), None, "model.unknwn"),
        (lambda c: c.__setattr__("optim", ml_collections.ConfigDict({**c.optim.to_dict(), "base_lr": "fast"})),
         None, "optim.base_lr: expected float, got str"),
        (lambda c: c.memory.__setattr__("size", 1000), None, "memory.size=1000"),
        (lambda c: c.memory.__setattr__("num_shards", 3), None, "memory.size=1024 is not divisible by memory.num_shards=3"),
        (lambda c: c.model.__setattr__("variant", "Q/16"), None, "model.variant"),
        (lambda c: c.model.__setattr__("pool", "max"), None, "model.pool"),
        (lambda c: c.crops.__setattr__("num_global", 1), None, "crops.num_global"),
        (lambda c: c.loss.__setattr__("student_temp", 0.0), None, "loss.student_temp"),
        (lambda c: c.mesh.__setattr__("shape", (3, -1, 1)), 8, "mesh.shape"),
        (lambda c: c.mesh.__setattr__("shape", (-1, 1, 1)), 6, "global_batch"),
        (lambda c: c.memory.__setattr__("num_shards", 4), 8, "memory.num_shards"),
        (lambda c: c.mesh.__setattr__("dcn_shape", (3, 1, 1)), 8, "mesh.dcn_shape=(3, 1, 1) does not divide the 1 granules"),
        (lambda c: c.mesh.__setattr__("granule", "rack"), None, "mesh.granule"),
        (lambda c: c.mesh.update(dcn_shape=(2, 1, 1), granule="slice"), 8, "mesh.granule='slice': cpu devices"),
    ],
)
def test_bad_values_fail_naming_the_key(mutate, devices, key, tiny_config):
    c = tiny_config()
    mutate(c)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        validate_config(c, devices=None if devices is None else jax.devices()[:devices])


def _from_command_line(*args: str) -> ml_collections.ConfigDict:
    """The config as `python -m mermed_jax.pretrain --config=... <args>` builds it."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["pretrain", *args]
    values = flags.FlagValues()  # config_flags reads argv when defined, as the CLIs' run() does with sys.argv
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("key,alias,value", [("global_batch", "batch", 512), ("epochs", "epochs", 50),
                                             ("num_train_images", "num_train_images", 1_000_000)])
def test_every_way_of_setting_a_value_gives_the_same_run(key, alias, value):
    """A --config.key= flag is applied after get_config returns: nothing derived may be frozen by then."""
    paper = str(ROOT / "configs" / "mermed_vitb16.py")
    by_flag = _from_command_line(f"--config={paper}", f"--config.{key}={value}")
    by_argument = _from_command_line(f"--config={paper}:{alias}={value}")
    by_file = cfg("mermed_vitb16")
    by_file[key] = value
    per_epoch = {derived.steps_per_epoch(c) for c in (by_flag, by_argument, by_file)}
    assert len(per_epoch) == 1
    if key == "global_batch":
        assert per_epoch == {6446}
    schedules = [build_schedules(c) for c in (by_flag, by_argument, by_file)]
    for other in schedules[1:]:
        for name in ("learning_rate", "weight_decay", "momentum", "teacher_temp"):
            np.testing.assert_array_equal(getattr(schedules[0], name), getattr(other, name))


def test_unset_num_train_images_counts_the_records_of_the_data(tmp_path, tiny_config):
    write_demo_data(tmp_path, images_per_modality=20, size=16, seed=0, shard_size=64)
    config = tiny_config("num_train_images=None,global_batch=8")
    config.data.dirs = tuple(str(tmp_path / f"demo_{m}") for m in ("ct", "cxr"))
    images = derived.train_images(config)
    assert images == sum(load_manifest(d).splits["train"].num_records for d in config.data.dirs)
    assert derived.steps_per_epoch(config) == -(-images // 8)
    config.data.dirs = ()
    with pytest.raises(ValueError, match="num_train_images"):
        derived.train_images(config)


@pytest.mark.parametrize("ablation", ["", "loss.modality_gating=False", "data.mixture=natural", "memory.size=2048",
                                      "seed=1"])
def test_the_real_image_recipe_and_its_ablations_validate(ablation):
    c = cfg("cpu_realdata", ",".join(filter(None, ["root=/data/converted", ablation])))
    validate_config(c, devices=jax.devices())
    assert c.data.dirs[0] == "/data/converted/breastmnist" and len(c.data.dirs) == 7
    assert c.loss.teacher_temp == c.loss.warmup_teacher_temp == 0.04 and c.optim.layer_decay == 1.0


def test_the_real_image_sweep_parts():
    from mermed_jax.eval.eval_config import validate

    main, finetune, full, curve = (cfg("eval_realdata", f"root=/d,part={p}")
                                   for p in ("main", "finetune", "finetune_full", "curve"))
    for c in (main, finetune, full, curve):
        validate(c)
    assert main.protocols == ("linear", "knn", "finetune") and main.finetune.label_fractions == (0.01, 0.1)
    assert finetune.protocols == ("finetune",) and finetune.name == main.name and finetune.datasets == main.datasets
    assert "pneumoniamnist" not in full.datasets and full.finetune.label_fractions == (1.0,)
    assert curve.checkpoints == "all" and curve.features == ("multiblock",)
    narrowed = cfg("eval_realdata", "root=/d,part=probes,features=multiblock+cls,baselines=none,seeds=0+2")
    assert narrowed.features == ("multiblock", "cls") and narrowed.baselines == () and narrowed.seeds == (0, 2)
    with pytest.raises(ValueError, match="part='probe'"):
        cfg("eval_realdata", "part=probe")
