"""Serial against the pool, measured side by side; the summary says if anything competed."""

from __future__ import annotations

import numpy as np

import tasks


def test_augmentation_speedup(kerasmp_speedup, kerasmp_pool, images):
    parts = np.array_split(images, 4)
    kerasmp_speedup(
        lambda: tasks.augment_all(images),
        lambda: np.concatenate(kerasmp_pool.map(tasks.augment, parts, range(4))),
        workers=len(kerasmp_pool.slots),
        rounds=3,
        variant="pool",
        check=lambda serial, parallel: np.testing.assert_array_equal(parallel, serial),
    )
