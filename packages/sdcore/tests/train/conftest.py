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


@pytest.fixture
def flux_like():
    """(layout, bundle) of a tiny FluxTransformer2DModel family (2 double + 3 single blocks)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from sdcore.models.flux import FLUX
    from sdcore.models.layout import layout_of_bundle
    from sdcore.testing.toyfamily import toy_transformer_bundle

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    with toy_transformer_bundle("toy-flux", transformer, like=FLUX, context_tokens=64) as bundle:
        yield layout_of_bundle(bundle), bundle


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: proves a check ran before loading (the pre-flight's promise)."""
    import sdcore.models.load as load_module
    import sdcore.train.loop as loop

    def fail(*args, **kwargs):
        pytest.fail("a model was loaded before the pre-flight stopped the run")

    monkeypatch.setattr(loop, "load_bundle", fail)
    monkeypatch.setattr(load_module, "load_model", fail)
    monkeypatch.setattr(load_module, "read_tiny", fail)
