"""Fixtures the cross-package tests share."""

import pytest


@pytest.fixture(scope="module")
def pm():
    """The installed plugins (entry points included), built once per test module."""
    from sdcore.plugins import get_plugin_manager

    return get_plugin_manager()


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (the importer tests' short runs are faster without thread start-up,
    and CI's two cores stay free for the other worker)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
