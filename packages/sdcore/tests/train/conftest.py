import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (short CPU runs are faster without thread start-up, and CI's two cores
    stay free for the other worker)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from sdcore.testing.contract import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("runtime-data"), n=4, size=64)


@pytest.fixture
def disk_full_at(monkeypatch):
    """``disk_full_at(path)``: from then on, moving a finished file onto ``path`` fails with ENOSPC (every
    atomic write ends in ``os.replace``), as a full disk would at the moment the result is saved."""
    import errno
    import os

    real_replace = os.replace

    def arm(path):
        def replace(src, dst, **kwargs):
            if Path(dst) == Path(path):
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "replace", replace)

    return arm
