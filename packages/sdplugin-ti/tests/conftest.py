from __future__ import annotations

import os

import pytest

os.environ.setdefault("SDCORE_CACHE_DIR", "/tmp/sdcore-cache-ti")


@pytest.fixture
def make_bundle():
    """A fresh tiny bundle per call (tests mutate tokenizers and encoders)."""
    from sdcore.models.tiny import create_tiny_bundle

    return create_tiny_bundle
