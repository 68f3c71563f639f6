import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _own_cache_root(tmp_path_factory):
    # The user's cache root for every test and the subprocesses they start: nothing lands in
    # ~/.cache, and a run's cache_dir outside its folder falls back here (training/run.py).
    old = os.environ.get("MOEKIT_CACHE")
    os.environ["MOEKIT_CACHE"] = str(tmp_path_factory.mktemp("moekit-cache-root"))
    yield
    if old is None:
        os.environ.pop("MOEKIT_CACHE", None)
    else:
        os.environ["MOEKIT_CACHE"] = old


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests' models and matmuls are tiny: one intra-op thread is as fast, and on a 2-core
    # CI machine two OpenMP threads beside pytest or a training subprocess get descheduled and
    # turn seconds into minutes. Session scope: module-scoped fixtures (trained runs) run
    # before any function-scoped one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # fresh but reproducible random inputs in every test
