"""ResumableSampler: a resumed epoch continues the same order; shards of all ranks form the global batches."""

from __future__ import annotations

import numpy as np
import pytest

from nlnet.engine.sampler import ResumableSampler


def test_order_depends_on_seed_and_epoch_only():
    a = ResumableSampler(50, shuffle=True, seed=4)
    b = ResumableSampler(50, shuffle=True, seed=4)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    b.set_epoch(4)
    assert list(a) != list(b)


def test_skipping_k_samples_gives_the_rest_of_the_epoch():
    sampler = ResumableSampler(23, shuffle=True, seed=0)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=10)
    assert list(sampler) == full[10:]
    assert len(sampler) == 13


@pytest.mark.parametrize("num_samples", [16, 17])
def test_rank_shards_make_up_the_single_process_global_batches(num_samples):
    world, per_rank = 2, 3
    single = ResumableSampler(num_samples, shuffle=True, seed=5)
    single.set_epoch(1)
    global_order = list(single)
    shards = []
    for rank in range(world):
        sampler = ResumableSampler(num_samples, shuffle=True, seed=5, rank=rank, world_size=world)
        sampler.set_epoch(1)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1]) == -(-num_samples // world)
    for i in range(num_samples // (world * per_rank)):
        together = sorted(idx for shard in shards for idx in shard[i * per_rank : (i + 1) * per_rank])
        assert together == sorted(global_order[i * world * per_rank : (i + 1) * world * per_rank])


def test_evaluation_shards_cover_every_index_once():
    shards = [ResumableSampler(7, shuffle=False, rank=r, world_size=3, pad=False) for r in range(3)]
    seen = np.concatenate([list(s) for s in shards])
    assert sorted(seen.tolist()) == list(range(7))
    assert [len(s) for s in shards] == [3, 2, 2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(0, shuffle=True)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(4, shuffle=True, rank=2, world_size=2)
