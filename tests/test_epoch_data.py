"""Resuming an epoch under another world size: which units are left (no Ray needed)."""

from __future__ import annotations

from clip_ray.data.stream.batches import StreamPosition
from clip_ray.data.stream.pipeline import rank_units
from clip_ray.worker.epoch_data import units_left


def _plan(count: int) -> list[dict]:
    return [{"index": i, "source": "s", "unit": f"shard-{i}.tar", "key": f"shard-{i}.tar", "piece": ""}
            for i in range(count)]


def _placed(after_unit: int) -> dict:
    return StreamPosition(window=3, batches_in_window=1, after_unit=after_unit, after_ordinal=17).as_dict()


def test_shares_cover_the_plan_once_and_share_the_tail_sample_by_sample():
    plan = _plan(7)
    shares = [rank_units(plan, rank, 3) for rank in range(3)]
    assert [[u["index"] for u in share] for share in shares] == [[0, 3, 6], [1, 4, 6], [2, 5, 6]]
    assert [(u["slice"], u["slices"]) for share in shares for u in share if u["index"] == 6] == [(0, 3), (1, 3),
                                                                                                  (2, 3)]
    fewer_units_than_workers = [rank_units(_plan(2), rank, 4) for rank in range(4)]
    assert all([u["index"] for u in share] == [0, 1] for share in fewer_units_than_workers)


def test_units_every_old_worker_finished_are_left_out():
    plan = _plan(10)
    # Two workers had units 0 2 4 6 8 and 1 3 5 7 9; their windows started inside units 4 and 7.
    left = units_left(plan, [_placed(4), _placed(7)], world_size=3)
    assert [u["index"] for u in left] == [4, 6, 7, 8, 9]
    # What is left is shared anew by the three workers, each unit once.
    shares = [rank_units(left, rank, 3) for rank in range(3)]
    assert {u["index"] for share in shares for u in share} == {4, 6, 7, 8, 9}


def test_a_shared_unit_is_never_counted_as_finished():
    plan = _plan(5)  # two workers: 0 2 | 1 3, and unit 4 shared by both
    left = units_left(plan, [_placed(4), _placed(4)], world_size=1)
    assert [u["index"] for u in left] == [4]
    assert [u["index"] for u in units_left(plan, [], world_size=2)] == [0, 1, 2, 3, 4]
