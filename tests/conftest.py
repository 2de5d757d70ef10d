"""Settings every test run needs, applied before any test module imports torch."""

import os
from typing import Iterator, List

import pytest

# The machine has 2 CPU cores shared by several jobs: one OpenMP thread per test process avoids
# oversubscription (measured faster than 2 threads when another process holds a core). An explicit
# OMP_NUM_THREADS in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def catalog() -> Iterator[List[str]]:
    """Dataset names a test registers; removed afterwards so tests do not see each other's datasets."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names: List[str] = []
    yield names
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
