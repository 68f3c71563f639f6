import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Fresh but reproducible random inputs in every test.
    torch.manual_seed(1234)
    # The tests' matmuls are small: one intra-op thread is as fast and does not oversubscribe
    # a 2-core CI machine when pytest or a training subprocess runs beside it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
