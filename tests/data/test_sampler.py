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
    """In every epoch, not only the first. With independent draws the ranks' epochs of a
    dataset drift apart, and a deal per epoch handed a rank windows another was still reading
    (a review counted 98 windows read twice and 118 not at all in one pass on 8 ranks): those
    ranks keep one deal, every window dealt, and reshuffle their part each epoch."""
    world = 3
    held = {}                                  # (dataset, epoch or None, window) -> rank
    every = {d: set() for d in range(len(SIZES))}
    for rank in range(world):
        s = MixtureSampler(SIZES, 2, seed=5, rank=rank, world_size=world,
                           same_dataset_across_ranks=same)
        for _ in range(600):
            d, ids = s.next()
            for i in ids:
                key = (d, s.epochs[d] if same else None, int(i))
                assert held.setdefault(key, rank) == rank, f"{key} on ranks {held[key]}, {rank}"
                every[d].add(int(i))
        assert max(s.epochs) >= 3                # several epochs of each dataset were read
    for d, size in enumerate(SIZES):
        if same:   # each epoch deals size // world · world windows anew: all are read over epochs
            assert every[d] == set(range(size))
            shards = [MixtureSampler(SIZES, 2, seed=5, rank=r, world_size=world,
                                     same_dataset_across_ranks=True).shard(d, 0)
                      for r in range(world)]
            union = np.concatenate(shards)
            assert len(union) == len(set(union.tolist())) == (size // world) * world
        else:      # one deal of every window: the parts are disjoint and cover the dataset
            parts = [set(MixtureSampler(SIZES, 2, seed=5, rank=r, world_size=world)
                         .shard(d, e).tolist()) for r in range(world) for e in (0, 1)]
            assert parts[0] == parts[1] and parts[0] != parts[2]
            assert set().union(*parts) == set(range(size)) == every[d]
            assert sum(len(p) for p in parts[::2]) == size


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


def test_weights_whose_sum_overflows_are_still_proportions():
    """Finite weights whose sum is inf passed the checks, then every draw failed (NaN
    probabilities)."""
    huge = MixtureSampler([40, 40], 2, weights=[1e308, 1e308])
    assert huge.weights.tolist() == [0.5, 0.5]
    assert MixtureSampler([40, 40], 2, weights=[1e308, 3e307]).weights.tolist() == \
        pytest.approx([1 / 1.3, 0.3 / 1.3])
    assert {huge.choose_dataset(step) for step in range(50)} == {0, 1}


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
    with pytest.raises(ConfigError, match="batch_size must be an integer, got 2.0"):
        MixtureSampler(SIZES, 2.0)
    with pytest.raises(ConfigError, match="dataset a is listed more than once"):
        MixtureSampler([10, 10], 1, names=["a", "a"])        # the loader and the trainer ask
    with pytest.raises(ConfigError, match="sizes .* must be non-negative"):
        MixtureSampler([10, -1], 1, weights=[1, 0])
    # a state of other datasets of the same sizes (their order swapped), an incomplete or a
    # damaged state: refused in one line rather than resumed with each other's positions or
    # failing later
    named = MixtureSampler([50, 50], 2, names=["a", "b"]).state_dict()
    with pytest.raises(ConfigError, match="names=\\['a', 'b'\\] but this run has \\['b', 'a'\\]"):
        MixtureSampler([50, 50], 2, names=["b", "a"]).load_state_dict(named)
    with pytest.raises(ConfigError, match="lacks cursors"):
        MixtureSampler(SIZES, 4, seed=1).load_state_dict(
            {k: v for k, v in state.items() if k != "cursors"})
    with pytest.raises(ConfigError, match="not 3 non-negative positions"):
        MixtureSampler(SIZES, 4, seed=1).load_state_dict({**state, "epochs": [0, 0]})


def test_a_world_size_without_a_rank_is_refused():
    """Without a process group to ask, every process would have been rank 0."""
    from dsfm.data.prefetch import _dist_rank_world
    with pytest.raises(ConfigError, match="world_size=4 without a rank"):
        _dist_rank_world(None, 4)
    assert _dist_rank_world(None, None) == (0, 1) and _dist_rank_world(2, 4) == (2, 4)


def test_a_dataset_of_weight_zero_need_not_fill_a_batch_and_is_never_drawn():
    sampler = MixtureSampler([2, 100], 4, weights=[0, 1], names=["tiny", "big"])
    assert {sampler.next()[0] for _ in range(50)} == {1}
