"""plan_memory: per-device state bytes from the shardings agree with XLA's argument sizes, and the
queue and the FSDP-sharded state shrink with the device count."""

import jax
import pytest

from mermed_jax import plan_memory

ARGS = "model.depth=1,crops.num_local=2,batch=16,memory=1024,partition=256,shards=8,model.scan_layers=True"


@pytest.mark.slow
def test_fsdp_over_8_devices_shards_state_and_queue(tiny_config):
    plans = {}
    for devices, mesh in ((1, (1, 1, 1)), (8, (1, 8, 1))):
        config = tiny_config(ARGS)
        config.mesh.shape = mesh
        plans[devices] = plan_memory.plan(config, jax.devices()[:devices])
    one, eight = plans[1], plans[8]
    assert eight["memory_queue"] * 8 == one["memory_queue"]
    for key in ("params", "optimizer", "teacher"):
        assert eight[key] < one[key] / 4, key  # the tiny model's replicated biases weigh more than ViT's
    for plan in (one, eight):
        state = sum(plan[k] for k in ("params", "optimizer", "teacher", "memory_queue", "other_state"))
        extra = plan["xla_arguments"] - state - plan["batch"]
        assert 0 <= extra <= 1024, extra  # the rng key and the schedule scalars
        assert plan["xla_aliased"] >= state - 1024  # the state is donated
    assert one["collective_bytes"] == dict.fromkeys(one["collective_bytes"], 0)
    assert eight["collective_bytes"]["all-gather"] > 0
    assert "memory queue" in plan_memory.format_plan(eight)
