"""Aesthetic embeddings and aesthetic-gradient personalisation on tiny CLIP models."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sdcore.errors import DataError, NetworkMismatchError, UnsafeFileError
from sdcore.models.text import chunked_input_ids, encode_prompts
from sdcore.models.tiny import create_tiny_bundle, tiny_text_encoder_config
from sdplugin_aesthetic.create import (
    create_aesthetic_embedding,
    load_aesthetic_embedding,
    load_clip,
    save_aesthetic_embedding,
)
from sdplugin_aesthetic.personalize import (
    AestheticPersonalizer,
    AestheticSettings,
    PersonalizationCache,
    personalized_conditioning,
    prompt_chunk_ids,
    slerp,
    tower_source,
    tower_states,
    tune_tower,
)

PROJECTION = 16


def _clip_model(text_config: dict):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
        "projection_dim": PROJECTION,
    }
    text = {**text_config, "projection_dim": PROJECTION}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION)).eval()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("clip")
    _clip_model(tiny_text_encoder_config("sd1")).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index, size in enumerate([(40, 48), (32, 32), (64, 40)]):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.{'png' if index % 2 else 'jpg'}")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_embedding_is_the_mean_of_raw_image_features(clip_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    """The extension (and vicgalle's script) average the raw projected features and save the mean as is."""
    embedding = create_aesthetic_embedding(images_dir, clip_dir, batch_size=2)
    # independent computation with transformers' own API
    from transformers import CLIPImageProcessor, CLIPModel

    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPImageProcessor.from_pretrained(clip_dir)
    images = [Image.open(p).convert("RGB") for p in sorted(images_dir.glob("img*"))]
    with torch.no_grad():
        out = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    expected = features.mean(0, keepdim=True)
    assert embedding.shape == (1, PROJECTION)
    torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-6)
    assert abs(float(embedding.norm()) - 1.0) > 1e-3  # stored unnormalised, as the extension writes it

    path = save_aesthetic_embedding(embedding, tmp_path / "style.pt")
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, torch.Tensor) and raw.shape == (1, PROJECTION) and raw.dtype == torch.float32
    torch.testing.assert_close(raw, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(load_aesthetic_embedding(path), expected[0] / expected.norm(), rtol=1e-5, atol=1e-6)


def test_reader_accepts_shipped_variants_and_refuses_pickles(tmp_path: Path) -> None:
    vector = torch.randn(PROJECTION) * 3
    torch.save(vector.half().unsqueeze(0), tmp_path / "half.pt")
    torch.save(vector, tmp_path / "flat.pt")
    for name in ("half.pt", "flat.pt"):
        loaded = load_aesthetic_embedding(tmp_path / name)
        assert loaded.shape == (PROJECTION,) and loaded.dtype == torch.float32
        torch.testing.assert_close(loaded.norm(), torch.tensor(1.0))
        torch.testing.assert_close(loaded, vector / vector.norm(), rtol=2e-3, atol=2e-3)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump(Evil(), handle, protocol=2)
    with pytest.raises(UnsafeFileError, match="evil"):
        load_aesthetic_embedding(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(DataError):
        create_aesthetic_embedding(tmp_path / "nothing", tmp_path)


def _sd1_setup():
    bundle = create_tiny_bundle("sd1")
    clip = _clip_model(tiny_text_encoder_config("sd1"))
    clip.text_model.load_state_dict(bundle.text_encoders[0].state_dict())  # SD1's encoder is CLIP's text tower
    embedding = torch.randn(PROJECTION, generator=torch.Generator().manual_seed(3))
    return bundle, clip, embedding / embedding.norm()


def test_tuning_raises_the_cosine_it_optimises() -> None:
    bundle, clip, embedding = _sd1_setup()
    source, offset = tower_source(bundle, clip)
    assert source is bundle.text_encoders[0] and offset == 0
    ids = chunked_input_ids(bundle.tokenizers[0], ["a watercolor castle"], chunks=1)[0]
    before = {k: v.clone() for k, v in source.state_dict().items()}
    _, history = tune_tower(source, clip.text_projection, ids, embedding.reshape(1, -1), steps=8, lr=1e-3)
    assert history[-1] > history[0] + 0.05, history
    for key, value in source.state_dict().items():  # the model's own encoder is untouched
        assert torch.equal(value, before[key])


def test_personalisation_changes_conditioning_and_weight_zero_does_not() -> None:
    from sdcore.generate.conditioning import encode_weighted_prompts

    bundle, clip, embedding = _sd1_setup()
    prompt = "a (watercolor:1.2) castle"
    with torch.no_grad():
        base = encode_weighted_prompts(bundle, [prompt])  # what sdcore generate encodes
    cache = PersonalizationCache()
    unchanged = personalized_conditioning(bundle, prompt, clip, embedding, weight=0.0, steps=5, lr=1e-3, cache=cache)
    assert torch.equal(unchanged.embeds, base.embeds) and len(cache) == 0
    styled = personalized_conditioning(bundle, prompt, clip, embedding, weight=0.9, steps=5, lr=1e-3, cache=cache)
    assert type(styled) is type(base) and styled.embeds.shape == base.embeds.shape
    assert (styled.embeds - base.embeds).abs().max() > 1e-3
    assert len(cache) == 1
    again = personalized_conditioning(bundle, prompt, clip, embedding, 0.9, 5, 1e-3, base=base, cache=cache)
    assert cache.hits == 1 and torch.equal(again.embeds, styled.embeds)
    # the tuned tokens are the emphasis-parsed ones generate encodes, not the literal "(watercolor:1.2)"
    assert cache_keys_tokens(cache) == [tuple(prompt_chunk_ids(bundle, "a watercolor castle", 1)[0].tolist())]
    # the blend is linear in the weight: w=0.45 lies halfway between base and w=0.9
    half = personalized_conditioning(bundle, prompt, clip, embedding, weight=0.45, steps=5, lr=1e-3, cache=cache)
    torch.testing.assert_close(half.embeds, (base.embeds + styled.embeds) / 2, rtol=1e-4, atol=1e-5)
    # text + slerp target and slerp blending run and differ from the plain result
    texted = personalized_conditioning(
        bundle, prompt, clip, embedding, 0.9, 5, 1e-3, text="dark", slerp=True, cache=cache
    )
    assert not torch.allclose(texted.embeds, styled.embeds)
    # a training-side Conditioning (hidden_states) works too and keeps its type
    with torch.no_grad():
        train_base = encode_prompts(bundle, ["a watercolor castle"])
    train_styled = personalized_conditioning(
        bundle, "a watercolor castle", clip, embedding, 0.9, 5, 1e-3, base=train_base
    )
    assert (train_styled.hidden_states - train_base.hidden_states).abs().max() > 1e-3
    # the personaliser leaves the negative prompt alone unless asked
    personalizer = AestheticPersonalizer(embedding, clip, AestheticSettings(0.9, 5, 1e-3), cache=cache)
    negative = personalizer(bundle, "", negative=True)
    with torch.no_grad():
        assert torch.equal(negative.embeds, encode_weighted_prompts(bundle, [""]).embeds)
    assert personalizer.info("style")["Aesthetic embedding"] == "style"


def cache_keys_tokens(cache: PersonalizationCache) -> list[tuple[int, ...]]:
    return [key[0] for key in cache._items]


def test_sd2_uses_the_full_clip_tower_one_layer_deeper() -> None:
    bundle = create_tiny_bundle("sd2")
    encoder = bundle.text_encoders[0]
    config = {**tiny_text_encoder_config("sd2"), "num_hidden_layers": 4}
    clip = _clip_model(config)
    # the diffusers SD2 encoder is the OpenCLIP tower without its last layer
    missing, unexpected = clip.text_model.load_state_dict(encoder.state_dict(), strict=False)
    assert not unexpected and all("layers.3." in key for key in missing)
    source, offset = tower_source(bundle, clip)
    assert source is clip.text_model and offset == 1
    prompt = "a misty forest"
    ids = chunked_input_ids(bundle.tokenizers[0], [prompt], chunks=1)
    with torch.no_grad():
        base = encode_prompts(bundle, [prompt])
        states = tower_states(clip.text_model, ids[0], 1 + offset)
    torch.testing.assert_close(states.unsqueeze(0).reshape(base.hidden_states.shape), base.hidden_states)
    embedding = torch.randn(PROJECTION)
    styled = personalized_conditioning(
        bundle, prompt, clip, embedding, 0.9, 3, 1e-3, base=base, cache=PersonalizationCache()
    )
    assert (styled.hidden_states - base.hidden_states).abs().max() > 1e-3


def test_mismatched_clip_and_sdxl_are_refused() -> None:
    bundle = create_tiny_bundle("sd1")
    wide = _clip_model({**tiny_text_encoder_config("sd1"), "hidden_size": 48, "intermediate_size": 96})
    with pytest.raises(NetworkMismatchError, match="width"):
        personalized_conditioning(bundle, "x", wide, torch.randn(PROJECTION), cache=PersonalizationCache())
    with pytest.raises(NetworkMismatchError, match="SDXL"):
        tower_source(create_tiny_bundle("sdxl"), wide)


def test_slerp_endpoints_and_angle() -> None:
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 1 / 3)
    torch.testing.assert_close(mid, torch.tensor([[np.cos(np.pi / 6), np.sin(np.pi / 6)]], dtype=torch.float32))


def test_load_clip_and_command(clip_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from sdplugin_aesthetic import plugin
    from sdplugin_aesthetic.commands import aesthetic_group

    model, processor = load_clip(clip_dir)
    assert model.text_projection.out_features == PROJECTION and processor is not None
    result = CliRunner().invoke(
        aesthetic_group,
        ["create", str(images_dir), "--clip", str(clip_dir), "--output", str(tmp_path / "s.pt"), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    assert "3 images" in result.output
    assert load_aesthetic_embedding(tmp_path / "s.pt").shape == (PROJECTION,)

    import click

    root = click.Group()
    plugin.sdcore_register_commands(root)
    assert "aesthetic" in root.commands


def test_handler_reads_generate_options_and_transforms(tmp_path: Path) -> None:
    from sdcore.generate.conditioning import encode_weighted_prompts
    from sdplugin_aesthetic import plugin
    from sdplugin_aesthetic.handler import AestheticHandler
    from transformers import CLIPImageProcessor

    bundle, clip, embedding = _sd1_setup()
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    save_aesthetic_embedding(embedding, tmp_path / "embs" / "style.pt")
    handler = AestheticHandler(tmp_path / "embs")
    with torch.no_grad():
        base = encode_weighted_prompts(bundle, ["a castle"])
    # off by default: no info, conditioning untouched
    activation = handler.activate(bundle, [], "a castle", "")
    assert activation.info == {} and handler.transform_conditioning(bundle, "a castle", base) is base
    handler.options = {
        "aesthetic": "style",
        "aesthetic_clip": str(tmp_path / "clip"),
        "aesthetic_weight": "0.9",
        "aesthetic_steps": "5",
        "aesthetic_lr": "1e-3",
    }
    activation = handler.activate(bundle, [], "a castle", "")
    assert activation.prompt == "a castle" and activation.info["Aesthetic embedding"] == "style"
    assert activation.info["Aesthetic steps"] == "5"
    styled = handler.transform_conditioning(bundle, "a castle", base)
    assert (styled.embeds - base.embeds).abs().max() > 1e-3
    assert handler.transform_conditioning(bundle, "", base, negative=True) is base
    handler.options["aesthetic_weight"] = "0"
    handler.activate(bundle, [], "a castle", "")
    assert torch.equal(handler.transform_conditioning(bundle, "a castle", base).embeds, base.embeds)

    specs: list = []
    plugin.sdcore_register_prompt_networks(specs.append)
    assert specs[0].tag is None and specs[0].load() is AestheticHandler


def test_vision_only_clip_checkpoint_creates_the_same_embedding(
    clip_dir: Path, images_dir: Path, tmp_path: Path
) -> None:
    from sdcore.errors import ModelFormatError
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    full = CLIPModel.from_pretrained(clip_dir)
    vision = CLIPVisionModelWithProjection(full.config.vision_config)
    vision.vision_model.load_state_dict(full.vision_model.state_dict())
    vision.visual_projection.load_state_dict(full.visual_projection.state_dict())
    vision.save_pretrained(tmp_path / "vision")
    CLIPImageProcessor.from_pretrained(clip_dir).save_pretrained(tmp_path / "vision")
    expected = create_aesthetic_embedding(images_dir, clip_dir)
    torch.testing.assert_close(create_aesthetic_embedding(images_dir, tmp_path / "vision"), expected)
    with pytest.raises(ModelFormatError, match="cannot load a CLIP model"):
        load_clip(tmp_path / "vision")  # personalisation needs the text tower too
    with pytest.raises(ModelFormatError, match="nowhere"):
        load_clip(tmp_path / "nowhere")


def test_generate_applies_aesthetic_gradients_end_to_end(tmp_path: Path) -> None:
    """Through sdcore's generation path: the image changes with weight 0.9, not with weight 0."""
    import numpy as np
    from sdcore.generate.pipeline import generate_images
    from sdcore.generate.session import NetworkSession
    from sdplugin_aesthetic.handler import AestheticHandler
    from transformers import CLIPImageProcessor

    bundle, clip, embedding = _sd1_setup()
    clip.save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    save_aesthetic_embedding(embedding, tmp_path / "embs" / "style.pt")

    def render(weight: str | None) -> np.ndarray:
        handler = AestheticHandler(tmp_path / "embs")
        if weight is not None:
            handler.options = {
                "aesthetic": "style",
                "aesthetic_clip": str(tmp_path / "clip"),
                "aesthetic_weight": weight,
                "aesthetic_steps": "5",
                "aesthetic_lr": "1e-2",
            }
        session = NetworkSession({None: handler})
        (image,) = generate_images(bundle, ["a castle"], steps=3, seed=1, width=64, height=64, networks=session)
        return np.asarray(image, dtype=np.int16)

    base = render(None)
    assert np.array_equal(render("0"), base)
    assert np.abs(render("0.9") - base).mean() > 0.5


def test_create_by_name_writes_where_generate_finds_it(clip_dir: Path, images_dir: Path, tmp_path: Path) -> None:
    """The extension's "Create aesthetic embedding" tab takes a name (its aesthetic_embeddings/NAME.pt);
    ``--name`` was "No such option". It writes under --models-dir, where the generate handler looks."""
    import sdplugin_aesthetic.plugin
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.generate.session import handlers_from_plugin_manager
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager(entrypoints=False, extra=[sdplugin_aesthetic.plugin])
    models = tmp_path / "models"
    args = ["aesthetic", "create", str(images_dir), "--clip", str(clip_dir), "--device", "cpu"]
    result = CliRunner().invoke(build_cli(pm), [*args, "--name", "gloomcore", "--models-dir", str(models)])
    assert result.exit_code == 0, result.output
    written = models / "aesthetic_embeddings" / "gloomcore.pt"
    assert f"wrote {written}" in result.output
    torch.testing.assert_close(
        load_aesthetic_embedding(written), load_aesthetic_embedding(_saved(images_dir, clip_dir, tmp_path))
    )
    (handler,) = handlers_from_plugin_manager(pm, models_dir=models)[None]
    assert handler.find("gloomcore") == written
    for extra, message in (
        ([], "give -o PATH, or --name NAME"),
        (["--name", "a", "-o", str(tmp_path / "b.pt")], "give -o PATH, or --name NAME"),
        (["--name", "../up"], "--name '../up': use letters, digits"),
    ):
        bad = CliRunner().invoke(build_cli(pm), [*args, *extra])
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output


def _saved(images_dir: Path, clip_dir: Path, tmp_path: Path) -> Path:
    return save_aesthetic_embedding(create_aesthetic_embedding(images_dir, clip_dir), tmp_path / "direct.pt")


def test_create_reads_the_folders_own_images_like_the_extension(
    clip_dir: Path, images_dir: Path, tmp_path: Path
) -> None:
    """The extension lists the source directory's own files (os.listdir); sdcore read its subfolders too, so a
    folder with e.g. a rejected/ subfolder gave another embedding than the extension's, without a word."""
    import shutil

    from click.testing import CliRunner
    from sdplugin_aesthetic.commands import aesthetic_group

    folder = tmp_path / "set"
    shutil.copytree(images_dir, folder)
    (folder / "rejected").mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "rejected" / "red.png")
    torch.testing.assert_close(
        create_aesthetic_embedding(folder, clip_dir), create_aesthetic_embedding(images_dir, clip_dir)
    )
    out = tmp_path / "s.pt"
    result = CliRunner().invoke(aesthetic_group, ["create", str(folder), "--clip", str(clip_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "(3 images, 16 dims; 1 images in subfolders left out, as the extension leaves them)" in result.output
    only_below = tmp_path / "only"
    (only_below / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(only_below / "sub" / "a.png")
    with pytest.raises(DataError, match="1 in its subfolders, which are not read"):
        create_aesthetic_embedding(only_below, clip_dir)
