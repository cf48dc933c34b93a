"""Memory the plan counts (issue 26): the training target's KV cache and rotary tables hold what a run reaches
(`plan.target_positions`), not the model's whole context, and the rotary tables are one pair shared by every
layer; the logits do not change, and a longer sequence still runs (the host regrows its rotary table)."""

import os

import pytest
import torch

from ppow_plugin.host import eagle_compat, patching
from ppow_plugin.training import plan
from ppow_plugin.config import load_config
from tiny import make_target, overrides

pytestmark = pytest.mark.skipif(patching.patch_status().state != "patched", reason="the EAGLE host is not patched")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return make_target(tmp_path_factory.mktemp("target"), layers=4, seed=2)  # max_position_embeddings 512


def rotaries(model):
    return [m for m in model.modules() if hasattr(m, "cos_cached") and hasattr(m, "inv_freq")]


def test_rotary_tables_sized_and_shared(target_dir):
    host = eagle_compat.load_host_target(target_dir, positions=40)
    tables = rotaries(host)
    assert len(tables) == 4
    assert {m.cos_cached.data_ptr() for m in tables} == {tables[0].cos_cached.data_ptr()}  # one pair for all layers
    assert tuple(tables[0].cos_cached.shape)[2] == 40 and tables[0].cos_cached.dtype == torch.float32
    full = eagle_compat.load_host_target(target_dir)
    assert tuple(rotaries(full)[0].cos_cached.shape)[2] == 512
    torch.testing.assert_close(tables[0].cos_cached, rotaries(full)[0].cos_cached[:, :, :40], rtol=0, atol=0)
    ids = torch.randint(4, 128, (1, 70))  # longer than the sized tables: they grow, with the same values
    with torch.no_grad():
        assert torch.equal(host(ids[:, :30]).logits, full(ids[:, :30]).logits)
        assert torch.equal(host(ids).logits, full(ids).logits)


def test_kv_cache_sized(target_dir):
    host = eagle_compat.load_host_target(target_dir, positions=40)
    kv = eagle_compat.new_kv_cache(host, 40)
    assert kv[0][0].data.shape[2] == 40 and host.config.max_position_embeddings == 512  # config left as it was
    assert eagle_compat.new_kv_cache(host)[0][0].data.shape[2] == 512  # no size: the host's own
    ids = torch.randint(4, 128, (1, 40))
    full_kv = eagle_compat.new_kv_cache(host)
    with torch.no_grad():
        a = host.model(input_ids=ids[:, :25], past_key_values=kv)[0]
        b = host.model(input_ids=ids[:, 25:], past_key_values=kv)[0]
        c = host.model(input_ids=ids, past_key_values=full_kv)[0]
    assert torch.equal(torch.cat([a, b], 1), c)


def test_trainer_allocates_what_the_plan_counts(tmp_path):
    """SFT and PPOW set-ups on the tiny target (512 positions): the cache and rotary rows are P, not 512."""
    from ppow_plugin.training import trainer
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sft_drafter = None
    for stage in ("sft", "ppow"):  # PPOW starts from the drafter the SFT set-up exports untrained
        extra = {"model.drafter": "null"} if stage == "sft" else {"model.drafter": str(sft_drafter),
                                                                   "rollout.verify": "greedy"}
        cfg = load_config(None, overrides(tmp_path, stage, **extra))
        t = trainer.Trainer(cfg)
        t.setup()
        try:
            positions = plan.target_positions(cfg)
            assert positions == (96 if stage == "sft" else 96 + 4 * 4)
            assert t.kv[0][0].data.shape[2] == positions
            assert tuple(rotaries(t.target)[0].cos_cached.shape)[2] == positions
            if stage == "sft":
                sft_drafter = t.export_drafter(tmp_path / "sft-drafter")
        finally:
            t.cleanup()
