"""A local TensorFlow cluster of two tasks, each on one of this process's own slots."""

from __future__ import annotations

import pytest

import tasks


def test_two_tasks_all_reduce_on_their_own_slots(kerasmp_tf_cluster, kerasmp_slots):
    if len(kerasmp_slots) < 2:
        pytest.skip("a 2-task cluster needs 2 slots of this process's own (under -n each worker owns one)")
    cluster = kerasmp_tf_cluster(2)
    results = cluster.run(tasks.cluster_sum)
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert [r["slot"]["index"] for r in results] == [s.index for s in kerasmp_slots[:2]]
    assert cluster.cluster_spec["worker"] == [f"127.0.0.1:{p}" for p in cluster.ports]
