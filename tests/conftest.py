import pytest
import torch


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
