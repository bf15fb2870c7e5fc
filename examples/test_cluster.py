"""A local TensorFlow cluster of two tasks, each on one of the two slots leased to the test
(under -n 2 --kerasmp-gpus=2 as without -n: the test leases both slots for its duration)."""

from __future__ import annotations

import pytest

import tasks


@pytest.mark.kerasmp_slots(2)
def test_two_tasks_all_reduce_on_their_own_slots(kerasmp_tf_cluster, kerasmp_slots):
    assert len(kerasmp_slots) == 2
    cluster = kerasmp_tf_cluster(2)
    results = cluster.run(tasks.cluster_sum)
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert [r["slot"]["index"] for r in results] == [s.index for s in kerasmp_slots[:2]]
    assert cluster.cluster_spec["worker"] == [f"127.0.0.1:{p}" for p in cluster.ports]
