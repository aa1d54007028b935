from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason in the summary, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device, and torch.cuda.is_available() is False here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def no_slab_outlives_the_suite():
    """The suite leaves /dev/shm as it found it. A hot-tier slab that appeared during the run and that no process
    but this one holds at the end was leaked by a test: it is removed, and the run fails naming it. (Slabs of
    other live processes, e.g. a benchmark running meanwhile, are theirs.) Set up before ``ray_local``, so
    checked after Ray is shut down."""
    from aios_ray.store.orphans import sweep

    before = {found.path for found in sweep(remove=False)}
    yield
    leaked = [found for found in sweep(remove=False)
              if found.path not in before and set(found.holders) <= {os.getpid()}]
    for found in leaked:
        found.path.unlink(missing_ok=True)
    if leaked:
        pytest.fail(f"the tests leaked {len(leaked)} hot-tier slab(s) in shared memory (removed now): "
                    + ", ".join(str(found.path) for found in leaked), pytrace=False)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024**2)
    yield ray
    ray.shutdown()
