import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Every module here runs tiny models on one torch thread (tests/conftest.py, ``one_thread``)."""
    yield
