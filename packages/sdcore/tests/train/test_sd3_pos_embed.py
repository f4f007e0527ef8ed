"""kohya's SD3 positional-embedding options on diffusers' SD3Transformer2DModel: ``--enable_scaled_pos_embed``
(one scaled sin-cos table per training resolution, picked by the input's patch area) and
``--pos_emb_random_crop_rate`` (a random crop of the table instead of its centre), checked against diffusers'
own sin-cos table and kohya's rules (library/sd3_models.py at sd-scripts 48d368f)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402
from runtime_methods import ProjOutMethod  # noqa: E402
from sdcore.models.sd3.pos_embed import CROPS_KEY, install, installed, scaled_sincos_pos_embed, uninstall  # noqa: E402
from sdcore.models.sd3.tiny import create_tiny_sd3  # noqa: E402
from sdcore.testing.contract import contract_options  # noqa: E402
from sdcore.train.data import SampleRef  # noqa: E402
from sdcore.train.loop import TrainSession  # noqa: E402
from sdcore.train.options import TrainOptions  # noqa: E402
from sdcore.train.preflight import option_problems  # noqa: E402
from sdcore.train.sd3_options import family_problems  # noqa: E402


def _diffusers_table(dim, side):
    """diffusers' MAE/DiT table on ``side`` patches, SD3's base size 16."""
    return get_2d_sincos_pos_embed(dim, side, base_size=16, interpolation_scale=1.0, output_type="pt").float()


def test_scaled_table_centre_is_the_trained_grid():
    """KohakuBlueleaf's scaled table of side g for a training size n: at g == n it is diffusers' table; for
    g > n its central n x n region is diffusers' n-table (the positions SD3 was trained with)."""
    torch.testing.assert_close(scaled_sincos_pos_embed(32, 6, 6), _diffusers_table(32, 6), rtol=0, atol=1e-6)
    centre = scaled_sincos_pos_embed(32, 6, 4).reshape(6, 6, 32)[1:5, 1:5].reshape(16, 32)
    torch.testing.assert_close(centre, _diffusers_table(32, 4), rtol=0, atol=1e-6)
    outer = scaled_sincos_pos_embed(32, 6, 4).reshape(6, 6, 32)
    assert not torch.allclose(outer[0, 0], outer[1, 1])


def test_tables_are_picked_by_area_as_kohya():
    """Training latents of 8 and 16 (patches 4 and 8): thresholds (16+64)//2 = 40 -> 4, int(12^2) = 144 -> 8;
    an input beyond the largest table gets its own table (side int(1.5 * 13) = 19)."""
    bundle = create_tiny_sd3(seed=0)
    transformer = bundle.transformer
    plain = transformer.pos_embed.cropped_pos_embed(8, 8).clone()
    hook = install(transformer, latent_sizes=[8, 16, 16])
    dim = hook.hidden_size
    assert hook.thresholds == [(40, 4), (144, 8)]
    assert installed(transformer) is hook
    cases = {(6, 6): 6, (7, 7): 12, (12, 5): 12}  # patches -> table side
    for (h, w), side in cases.items():
        assert hook.table_for(h, w)[1] == side
    # a 4 x 4 patch input (latent 8 x 8) is the centre of the size-4 table: diffusers' 4-table
    torch.testing.assert_close(
        transformer.pos_embed.cropped_pos_embed(8, 8)[0], _diffusers_table(dim, 4), rtol=0, atol=1e-6
    )
    big = hook.table_for(13, 13)
    assert big[1] == 19 and (361, 13) in hook.thresholds
    uninstall(transformer)
    assert installed(transformer) is None and torch.equal(transformer.pos_embed.cropped_pos_embed(8, 8), plain)


def _session(tmp_path, **overrides):
    base = {"max_steps": 2, "save_state": False, "t5xxl_max_token_length": 16, "batch_size": 2}
    o = contract_options(ProjOutMethod, tmp_path, {**base, **overrides}, family="sd3", tag=str(sorted(overrides)))
    s = TrainSession(ProjOutMethod(o), bundle=None)
    s.setup()
    return s


def test_random_crops_are_per_sample_draws_after_the_others(tmp_path):
    """Rate 1.0: every sample crops at (top, left) drawn from its noise generator after its noise and timestep
    (replayed by hand: rand < rate, then randint top, randint left); the forward adds exactly that slice of
    the table; the same sample gets the same crop alone or in a batch."""
    s = _session(tmp_path, pos_emb_random_crop_rate=1.0, enable_scaled_pos_embed=True)
    hook = installed(s.bundle.transformer)
    refs = [SampleRef(entry, 0, epoch) for epoch in range(3) for entry in range(4)]
    batch = s.make_batch(refs[:2])
    shape = batch.latents.shape[1:]
    h, w = shape[-2] // hook.patch_size, shape[-1] // hook.patch_size
    table, side = hook.table_for(h, w)
    crops = []
    for ref in refs:
        b = s.make_batch([ref])
        s.objective.draw_for([ref], b)
        crops += b.extra[CROPS_KEY]
        gen = torch.Generator().manual_seed(ref.seed(s.options.seed, "noise"))
        torch.randn(tuple(shape), generator=gen)
        torch.randn((1,), generator=gen)
        assert float(torch.rand((), generator=gen)) < 1.0
        top = int(torch.randint(0, side - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, side - w + 1, (1,), generator=gen))
        assert b.extra[CROPS_KEY] == [(top, left)]
    assert len(set(crops)) > 1
    b = s.make_batch(refs[:2])
    s.objective.draw_for(refs[:2], b)
    assert b.extra[CROPS_KEY] == crops[:2]
    hook.crops = b.extra[CROPS_KEY]
    out = s.bundle.transformer.pos_embed.cropped_pos_embed(shape[-2], shape[-1])
    hook.crops = None
    grid = table.reshape(side, side, -1)
    for i, (top, left) in enumerate(crops[:2]):
        torch.testing.assert_close(out[i], grid[top : top + h, left : left + w].reshape(h * w, -1))


def test_a_run_with_both_options_trains_and_restores_the_model(tmp_path):
    plain = _session(tmp_path / "plain").run().losses
    s = _session(tmp_path, pos_emb_random_crop_rate=0.5, enable_scaled_pos_embed=True)
    assert installed(s.bundle.transformer) is not None
    losses = s.run().losses
    assert all(torch.isfinite(torch.tensor(losses))) and losses != plain
    assert installed(s.bundle.transformer) is None  # the model's own table again after the run


def test_preflight_checks():
    bad = TrainOptions(model="m", data="d", output="o", pos_emb_random_crop_rate=1.5)
    assert any("--pos-emb-random-crop-rate must be between 0 and 1" in p for p in option_problems(bad))
    on = TrainOptions(pos_emb_random_crop_rate=0.1, enable_scaled_pos_embed=True)
    assert family_problems(on, "sd3") == []
    assert len(family_problems(on, "flux")) == 2


def test_a_w_h_resolution_sizes_the_tables_as_kohya(tmp_path, monkeypatch):
    """kohya: ``round(sqrt(w * h)) // 8`` per resolution; for 80x64 that is 9 (sqrt 71.55), where the side of
    the same area floored (71) would give 8."""
    import sdcore.models.sd3.pos_embed as pos_embed

    seen = []
    real = pos_embed.install

    def spy(transformer, latent_sizes=None, **kw):
        seen.append(latent_sizes)
        return real(transformer, latent_sizes=latent_sizes, **kw)

    monkeypatch.setattr(pos_embed, "install", spy)
    _session(tmp_path, enable_scaled_pos_embed=True, resolution=71, resolution_size=(80, 64), bucket_step=8)
    _session(tmp_path / "side", enable_scaled_pos_embed=True, resolution=64)
    assert seen == [[9], [8]]
