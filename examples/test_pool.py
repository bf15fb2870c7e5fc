"""The session pool, the pool factory and plan_slots: every worker on this process's slots."""

from __future__ import annotations

import numpy as np

import tasks
from placement_rules import assert_placed
from pytest_kerasmp import WorkerPool, plan_slots


def test_session_pool_workers_sit_on_my_slots(kerasmp_pool, kerasmp_slots):
    seen = kerasmp_pool.broadcast(tasks.where)
    assert len({s["pid"] for s in seen}) == len(kerasmp_slots)
    for s in seen:
        assert_placed(s, kerasmp_slots)


def test_augmentation_in_the_pool_equals_serial(kerasmp_pool, images):
    parts = np.array_split(images, 4)
    parallel = np.concatenate(kerasmp_pool.map(tasks.augment, parts, range(4)))
    np.testing.assert_array_equal(parallel, tasks.augment_all(images))


def test_factory_pool_defaults_to_my_slots(kerasmp_pool_factory, kerasmp_slots):
    pool = kerasmp_pool_factory(warm_import=False)
    for s in pool.broadcast(tasks.where):
        assert_placed(s, kerasmp_slots)


def test_plan_slots_spreads_over_what_this_process_owns(kerasmp_slots):
    # Without -n this process owns every slot of the session; under -n its worker's part.
    with WorkerPool(plan_slots(len(kerasmp_slots)), warm_import=False, name="planned") as pool:
        seen = pool.broadcast(tasks.where)
    if len(kerasmp_slots) >= 2 and kerasmp_slots[0].kind == "CPU":
        assert seen[0]["cores"] != seen[1]["cores"], seen  # two workers, two different cores
    elif len(kerasmp_slots) >= 2:
        assert seen[0]["cuda_visible_devices"] != seen[1]["cuda_visible_devices"], seen
    owned = {c for s in kerasmp_slots for c in s.cores} or {s.gpu for s in kerasmp_slots}
    for s in seen:
        assert set(s["cores"]) <= owned or s["cuda_visible_devices"] in owned, (s, owned)
