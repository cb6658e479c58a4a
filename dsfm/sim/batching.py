"""Splitting a batch of trajectories into cache-sized chunks.

Whole-batch temporaries of several MB fall out of cache and make the allocator hand memory back
to the system and fault it in again on every numpy operation; integrating a few tens of thousands
of cells at a time runs 2-4x faster on the same core.
"""


def chunks(n_trajectories: int, n: int, cells: int) -> list[slice]:
    """Slices covering the batch, each of about `cells` grid cells (at least one trajectory)."""
    size = max(1, cells // (n * n))
    return [slice(start, min(start + size, n_trajectories))
            for start in range(0, n_trajectories, size)]
