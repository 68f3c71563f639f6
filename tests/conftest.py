import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # Fresh but reproducible random inputs in every test.
    torch.manual_seed(1234)
    yield
