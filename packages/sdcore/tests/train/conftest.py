import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from sdcore.testing.contract import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("runtime-data"), n=4, size=64)
