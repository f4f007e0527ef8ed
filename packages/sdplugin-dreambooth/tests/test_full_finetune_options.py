"""kohya's full fine-tune options of sdxl_train.py / sd3_train.py on `sdcore train dreambooth`:
``--learning_rate_te1/2/3`` (each encoder's rate, 0 = frozen), ``--train_t5xxl`` (T5 trains only with it),
``--num_last_block_to_freeze`` (the last N x_block tensors in kohya's MMDiT order), and the names
accepted with a note or refused (``save_clip``, ``save_t5xxl``), and ``use_t5xxl_cache_only`` (the text cache on)."""

from __future__ import annotations

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.models.family import family_adapter
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.config import load_options
from sdcore.train.loop import TrainSession
from sdplugin_dreambooth.method import DreamBoothMethod
from sdplugin_dreambooth.options import DreamBoothOptions


def _options(tmp_path, **overrides):
    base = dict(
        model="tiny:sd3",
        data=str(make_tiny_dataset(tmp_path / "data", n=2, repeats=1)),
        output=str(tmp_path / "out" / "db.safetensors"),
        resolution=64, min_bucket_reso=64, batch_size=1, lr=1e-3, max_steps=2, seed=0, progress=False,
        save_dtype="fp32", save_state=False, max_grad_norm=0.0,
    )  # fmt: skip
    base.update(overrides)
    return DreamBoothOptions(**base)


def _groups(options, family="sd3"):
    bundle = family_adapter(family).create_tiny()
    groups = DreamBoothMethod(options).prepare(bundle)
    return bundle, {g["name"]: g for g in groups}


def _ids(module):
    return {id(p) for p in module.parameters()}


def test_default_text_encoder_training_is_clip_only_in_one_group(tmp_path):
    """kohya sd3_train.py: --train_text_encoder trains CLIP-L and CLIP-G at the one rate; T5 stays frozen."""
    bundle, groups = _groups(_options(tmp_path, train_text_encoder=True, te_lr=5e-4))
    assert set(groups) == {"unet", "text_encoder"} and groups["text_encoder"]["lr"] == 5e-4
    clip_l, clip_g, t5 = bundle.text_encoders
    assert {id(p) for p in groups["text_encoder"]["params"]} == _ids(clip_l) | _ids(clip_g)
    assert not any(p.requires_grad for p in t5.parameters())


def test_each_encoder_gets_its_rate_and_zero_keeps_it_frozen(tmp_path):
    o = _options(tmp_path, train_text_encoder=True, te1_lr=0.0, te2_lr=2e-4, train_t5=True, te3_lr=3e-4)
    bundle, groups = _groups(o)
    clip_l, clip_g, t5 = bundle.text_encoders
    assert set(groups) == {"unet", "text_encoder_1", "text_encoder_2"}
    assert (groups["text_encoder_1"]["lr"], groups["text_encoder_2"]["lr"]) == (2e-4, 3e-4)
    assert {id(p) for p in groups["text_encoder_1"]["params"]} == _ids(clip_g)
    assert {id(p) for p in groups["text_encoder_2"]["params"]} == _ids(t5)
    assert not any(p.requires_grad for p in clip_l.parameters())
    # a rate not given falls back to --te-lr, then --lr (kohya: learning_rate)
    _, groups = _groups(_options(tmp_path, train_text_encoder=True, te2_lr=2e-4, train_t5=True))
    assert [groups[f"text_encoder_{i}"]["lr"] for i in range(3)] == [1e-3, 2e-4, 1e-3]
    # SDXL (sdxl_train.py): te1 is CLIP-L, te2 CLIP-G (bigG)
    bundle, groups = _groups(_options(tmp_path, model="tiny:sdxl", train_text_encoder=True, te1_lr=1e-4), "sdxl")
    assert (groups["text_encoder_0"]["lr"], groups["text_encoder_1"]["lr"]) == (1e-4, 1e-3)
    assert {id(p) for p in groups["text_encoder_1"]["params"]} == _ids(bundle.text_encoders[1])


def test_a_run_changes_only_what_trains(tmp_path):
    o = _options(tmp_path, train_text_encoder=True, te1_lr=0.0, num_last_block_to_freeze=9)
    start = family_adapter("sd3").create_tiny()
    session = TrainSession(DreamBoothMethod(o), bundle=family_adapter("sd3").create_tiny())
    session.run()
    trained = session.bundle
    for index, changed in enumerate((False, True, False)):  # CLIP-L at rate 0, CLIP-G trains, T5 frozen
        before, after = start.text_encoders[index].state_dict(), trained.text_encoders[index].state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before) == changed, index
    # kohya's SingleDiTBlock order of the last block's x_block tensors, from the end: adaLN_modulation,
    # mlp.fc2, mlp.fc1, attn.proj (bias, then weight of each), then the fused qkv's bias (q, k and v)
    frozen = {f"transformer_blocks.1.{name}" for name in (
        "norm1.linear.bias", "norm1.linear.weight", "ff.net.2.bias", "ff.net.2.weight", "ff.net.0.proj.bias",
        "ff.net.0.proj.weight", "attn.to_out.0.bias", "attn.to_out.0.weight", "attn.to_q.bias", "attn.to_k.bias",
        "attn.to_v.bias",
    )}  # fmt: skip
    before, after = start.transformer.state_dict(), trained.transformer.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not changed & frozen and "transformer_blocks.1.attn.to_q.weight" in changed
    assert {k for k, p in trained.transformer.named_parameters() if not p.requires_grad} == frozen


def test_bad_combinations_are_refused(tmp_path):
    for overrides, words in (
        ({"train_t5": True}, "--train-t5 needs --train-text-encoder"),
        ({"te2_lr": 1e-4}, "need --train-text-encoder"),
        ({"train_text_encoder": True, "te3_lr": 1e-4}, "needs --train-t5"),
        ({"train_text_encoder": True, "te1_lr": -1.0}, "must be 0 (frozen) or positive"),
        ({"num_last_block_to_freeze": -1}, "must be 0 (off) or more"),
    ):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            DreamBoothMethod(_options(tmp_path, **overrides)).validate()
    method = DreamBoothMethod(_options(tmp_path, train_text_encoder=True, te2_lr=1e-4, train_t5=True))
    assert any("sd1 model has no CLIP-G" in p for p in method.family_problems("sd1"))
    assert any("sdxl model has no T5" in p for p in method.family_problems("sdxl"))
    assert method.family_problems("sd3") == []
    assert (
        "kohya's sd3_train.py option"
        in DreamBoothMethod(_options(tmp_path, num_last_block_to_freeze=2)).family_problems("flux")[0]
    )


def test_kohya_sd3_train_names():
    notes: list[str] = []
    o = load_options(
        DreamBoothOptions,
        None,
        kohya={"learning_rate_te1": "1e-5", "learning_rate_te2": "0", "learning_rate_te3": "2e-5",
               "train_t5xxl": True, "num_last_block_to_freeze": "4", "save_clip": True, "save_t5xxl": True,
               "train_text_encoder": True},
        notes=notes,
    )  # fmt: skip
    assert (o.te1_lr, o.te2_lr, o.te3_lr, o.train_t5, o.num_last_block_to_freeze) == (1e-5, 0.0, 2e-5, True, 4)
    assert any(n.startswith("save_clip: ") and "DOES NOT WORK" in n for n in notes)
    notes.clear()
    # kohya sd3_train.py turns cache_text_encoder_outputs on for it, over an explicit false (its L86-91): T5's
    # outputs are then cached while CLIP trains (test_partial_text_cache.py)
    o = load_options(DreamBoothOptions, None, kohya={"use_t5xxl_cache_only": True, "train_text_encoder": True},
                     notes=notes)  # fmt: skip
    assert o.cache_text_encoder_outputs is True and not [n for n in notes if "use_t5xxl_cache_only" in n]
    o = load_options(DreamBoothOptions, None, kohya={"use_t5xxl_cache_only": "true", "cache_text_encoder_outputs": False},
                     notes=notes)  # fmt: skip
    assert o.cache_text_encoder_outputs is True
    assert "use_t5xxl_cache_only: turns cache_text_encoder_outputs on, as kohya's sd3_train.py does" in notes
    assert load_options(DreamBoothOptions, None, kohya={"use_t5xxl_cache_only": False}).cache_text_encoder_outputs is (
        DreamBoothOptions().cache_text_encoder_outputs
    )
    with pytest.raises(ConfigError, match="use_t5xxl_cache_only with train_t5xxl"):
        load_options(DreamBoothOptions, None, kohya={"use_t5xxl_cache_only": True, "train_t5xxl": True})


@pytest.mark.parametrize(("model", "trained"), [("tiny:sd1", True), ("tiny:sdxl", False), ("tiny:sd3", False)])
def test_kohya_terms_train_the_text_encoder_by_default_only_as_train_db(tmp_path, model, trained):
    """kohya's train_db.py (SD1/SD2) trains the text encoder unless told otherwise; sdxl_train.py and
    sd3_train.py train it only with --train_text_encoder. A kohya-terms config gets the script's default."""
    config = tmp_path / "kohya.toml"
    config.write_text(f'pretrained_model_name_or_path = "{model}"\ntrain_data_dir = "data"\noutput_dir = "out"\n')
    notes: list[str] = []
    options = load_options(DreamBoothOptions, config, notes=notes)
    assert options.train_text_encoder is trained
    assert any("text encoder is trained" in note for note in notes) is trained


@pytest.mark.parametrize("model", ["tiny:flux", "tiny:sdxl"])
def test_kohya_use_t5xxl_cache_only_is_read_by_sd3_train_alone(tmp_path, model):
    """Only kohya's sd3_train.py defines --use_t5xxl_cache_only (its L1009; flux_train.py and sdxl_train.py have no
    such option, and kohya's read_config_from_file keeps a TOML's unknown keys unread, train_util.py ~L4760): on a
    FLUX.1 or SDXL model an explicit ``cache_text_encoder_outputs = false`` stays false, with a note saying why."""
    path = tmp_path / "kohya.toml"
    path.write_text(
        f'pretrained_model_name_or_path = "{model}"\nuse_t5xxl_cache_only = true\ncache_text_encoder_outputs = false\n'
        'train_data_dir = "data"\noutput_dir = "out"\n',
        encoding="utf-8",
    )
    notes: list[str] = []
    o = load_options(DreamBoothOptions, path, notes=notes)
    assert o.cache_text_encoder_outputs is False
    assert not any("as kohya does" in n for n in notes)
    assert any(n.startswith("use_t5xxl_cache_only: ") and "sd3_train.py" in n for n in notes), notes
    path.write_text(path.read_text().replace(model, "tiny:sd3"), encoding="utf-8")
    assert load_options(DreamBoothOptions, path).cache_text_encoder_outputs is True  # sd3_train.py turns it on


def test_kohya_learning_rate_te_zero_keeps_the_text_encoder_frozen():
    """train_db.py / fine_tune.py give the text encoder its own optimizer group at learning_rate_te (train_db.py
    L189-197, fine_tune.py L221-228): at 0 it does not move. It was read as "not set" (trained at learning_rate)."""
    notes: list[str] = []
    kohya = {"learning_rate": 1e-5, "learning_rate_te": 0, "train_text_encoder": True}
    o = load_options(DreamBoothOptions, None, kohya=kohya, notes=notes)
    assert o.te_lr == 0.0 and o.train_text_encoder
    assert "learning_rate_te = 0: the text encoder stays frozen (kohya trains it at rate 0)" in notes
    bundle = family_adapter("sd1").create_tiny()
    assert DreamBoothMethod(o).text_encoder_rates(bundle) == {}


_FLUX_TE_KEYS = "train_text_encoder = true\ntrain_t5xxl = true\nlearning_rate_te1 = 1e-5\nlearning_rate_te3 = 0\n"


@pytest.mark.parametrize("model", ["tiny:flux", "tiny:sd3"])
def test_kohya_flux_train_never_trains_a_text_encoder(tmp_path, model):
    """kohya's flux_train.py defines no --train_text_encoder, --train_t5xxl or --learning_rate_te* (its setup_parser,
    L785-850, and the train_util/flux_train_utils argument groups it adds) and freezes CLIP-L and T5 (L226-227); a
    config file's undefined keys are read and never used (train_util.py read_config_from_file ~L4760). So a kohya
    FLUX.1 full fine-tune config trains no text encoder (a note says why); sd3_train.py defines all of them."""
    path = tmp_path / "kohya.toml"
    path.write_text(f'pretrained_model_name_or_path = "{model}"\n{_FLUX_TE_KEYS}train_data_dir = "data"\n'
                    'output_dir = "out"\n', encoding="utf-8")  # fmt: skip
    notes: list[str] = []
    o = load_options(DreamBoothOptions, path, notes=notes)
    flux = model == "tiny:flux"
    assert (o.train_text_encoder, o.train_t5) == (not flux, not flux)
    assert (o.te1_lr, o.te3_lr) == ((None, None) if flux else (1e-5, 0.0))
    said = [n for n in notes if "flux_train.py" in n]
    assert said == (
        ["train_text_encoder, train_t5xxl, learning_rate_te1, learning_rate_te3: kohya's FLUX.1 fine-tune script "
         "(flux_train.py) does not define it and keeps the text encoders frozen; no effect (sdcore's "
         "--train-text-encoder trains CLIP-L)"] if flux else []
    )  # fmt: skip
    if flux:
        bundle, groups = _groups(o, "flux")
        assert set(groups) == {"unet"} and not any(
            p.requires_grad for e in bundle.text_encoders for p in e.parameters()
        )
        # sdcore's own --train-text-encoder on the command line keeps sdcore's FLUX.1 text-encoder training
        o = load_options(DreamBoothOptions, path, {"train_text_encoder": True})
        assert o.train_text_encoder and (o.te1_lr, o.train_t5) == (1e-5, True)
