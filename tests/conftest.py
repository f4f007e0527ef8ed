"""Fixtures the cross-package tests share."""

import pytest


@pytest.fixture(scope="module")
def pm():
    """The installed plugins (entry points included), built once per test module."""
    from sdcore.plugins import get_plugin_manager

    return get_plugin_manager()
