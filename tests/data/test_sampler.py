"""MixtureSampler: one dataset per micro-batch, weights, rank sharding, epochs, exact resume."""

import numpy as np
import pytest

from dsfm.data.sampler import MixtureSampler
from dsfm.errors import ConfigError

SIZES = [103, 57, 240]


def draw(sampler, n):
    return [sampler.next() for _ in range(n)]


def test_deterministic_given_seed():
    a = draw(MixtureSampler(SIZES, 4, seed=1), 200)
    b = draw(MixtureSampler(SIZES, 4, seed=1), 200)
    c = draw(MixtureSampler(SIZES, 4, seed=2), 200)
    assert all(da == db and np.array_equal(ia, ib) for (da, ia), (db, ib) in zip(a, b))
    assert any(da != dc or not np.array_equal(ia, ic) for (da, ia), (dc, ic) in zip(a, c))


@pytest.mark.parametrize("same", [False, True])
def test_ranks_never_share_a_window_within_an_epoch(same):
    world = 3
    seen = {}
    for rank in range(world):
        s = MixtureSampler(SIZES, 2, seed=5, rank=rank, world_size=world,
                           same_dataset_across_ranks=same)
        for d, ids in draw(s, 300):
            if s.epochs[d] == 0:
                for i in ids:
                    assert (d, int(i)) not in seen, f"window {i} of {d} on ranks " \
                                                     f"{seen[(d, int(i))]} and {rank}"
                    seen[(d, int(i))] = rank
    for d, size in enumerate(SIZES):
        shards = [MixtureSampler(SIZES, 2, seed=5, rank=r, world_size=world).shard(d, 0)
                  for r in range(world)]
        union = np.concatenate(shards)
        assert len(union) == len(set(union.tolist())) == (size // world) * world


def test_same_dataset_across_ranks_when_asked():
    seqs = [[d for d, _ in draw(MixtureSampler(SIZES, 2, seed=3, rank=r, world_size=4,
                                               same_dataset_across_ranks=True), 100)]
            for r in range(4)]
    assert all(s == seqs[0] for s in seqs)
    free = [[d for d, _ in draw(MixtureSampler(SIZES, 2, seed=3, rank=r, world_size=4), 100)]
            for r in range(4)]
    assert any(s != free[0] for s in free)


def test_weights_set_the_mixture():
    s = MixtureSampler(SIZES, 1, seed=0, weights=[6, 3, 1])
    counts = np.bincount([d for d, _ in draw(s, 5000)], minlength=3) / 5000
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.02)
    uniform = np.bincount([d for d, _ in draw(MixtureSampler(SIZES, 1), 3000)]) / 3000
    np.testing.assert_allclose(uniform, [1 / 3] * 3, atol=0.03)


def test_epochs_cover_each_shard_then_reshuffle():
    s = MixtureSampler([40], 5, seed=9)
    first = np.concatenate([ids for _, ids in draw(s, 8)])
    second = np.concatenate([ids for _, ids in draw(s, 8)])
    assert sorted(first.tolist()) == list(range(40)) == sorted(second.tolist())
    assert not np.array_equal(first, second)
    assert s.epochs == [1] and s.cursors == [40]


def test_resume_continues_with_exactly_the_next_batches():
    a = MixtureSampler(SIZES, 8, seed=4, rank=1, world_size=2, weights=[1, 2, 3])
    draw(a, 57)
    state = a.state_dict()
    expected = draw(a, 80)
    b = MixtureSampler(SIZES, 8, seed=4, rank=1, world_size=2, weights=[1, 2, 3])
    b.load_state_dict(state)
    got = draw(b, 80)
    assert all(da == db and np.array_equal(ia, ib) for (da, ia), (db, ib) in zip(expected, got))


def test_bad_configurations():
    with pytest.raises(ConfigError, match="dataset small has 10 windows"):
        MixtureSampler([100, 10], 4, world_size=3, names=["big", "small"])
    with pytest.raises(ConfigError, match="weights"):
        MixtureSampler(SIZES, 1, weights=[1, -1, 1])
    with pytest.raises(ConfigError, match="rank 2"):
        MixtureSampler(SIZES, 1, rank=2, world_size=2)
    state = MixtureSampler(SIZES, 4, seed=1).state_dict()
    with pytest.raises(ConfigError, match="seed"):
        MixtureSampler(SIZES, 4, seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        MixtureSampler(SIZES, 4, seed=-1)


def test_a_dataset_of_weight_zero_need_not_fill_a_batch_and_is_never_drawn():
    sampler = MixtureSampler([2, 100], 4, weights=[0, 1], names=["tiny", "big"])
    assert {sampler.next()[0] for _ in range(50)} == {1}
