"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture
def two_threads():
    """torch on 2 threads for the test (the machines here have 2 cores), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
