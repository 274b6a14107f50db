"""Fixtures shared by several test files."""
import pytest

from qdrop.io import torch_threads


@pytest.fixture
def two_threads():
    """torch on 2 threads for the test (the machines here have 2 cores), restored afterwards."""
    with torch_threads(2):
        yield
