"""docs/offline-models.md: every hub model the docs mention has a one-command recipe, and the folder
each recipe produces is what the tool reads (issue 18).

No network here: a recipe is replayed on a stand-in repository (a tiny model saved the way the
real repository is laid out, plus files the recipe must leave out), copying exactly the files the
``hf download`` command names (or, for ``--exclude`` recipes, everything its patterns let through).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "docs" / "offline-models.md"
HUB_ID = re.compile(r"\b((?:SmilingWolf|openai|laion|Salesforce)/[\w.-]*[\w])")


def recipes() -> dict[str, dict[str, object]]:
    """repo id -> {files, exclude, local_dir} for each ``hf download`` command in the recipes page."""
    out: dict[str, dict[str, object]] = {}
    for command in re.findall(r"`(hf download [^`]+)`", RECIPES.read_text(encoding="utf-8")):
        words = shlex.split(command)[2:]
        repo, files, exclude, local_dir = words[0], [], [], None
        rest = iter(words[1:])
        for word in rest:
            if word == "--exclude":
                exclude.append(next(rest))
            elif word == "--local-dir":
                local_dir = next(rest)
            elif word.startswith("-"):
                raise AssertionError(f"unexpected option {word} in {command}")
            else:
                files.append(word)
        out[repo] = {"files": files, "exclude": exclude, "local_dir": local_dir}
    return out


def replay(repo_folder: Path, recipe: dict[str, object], target: Path) -> Path:
    """Copy what the recipe would download from ``repo_folder`` into ``target``."""
    names = [p.name for p in repo_folder.iterdir() if p.is_file()]
    files = list(recipe["files"])  # type: ignore[arg-type]
    if files:
        missing = [f for f in files if f not in names]
        assert not missing, f"the recipe names files the repository layout lacks: {missing}"
        chosen = files
    else:
        chosen = [n for n in names if not any(fnmatch.fnmatch(n, pat) for pat in recipe["exclude"])]  # type: ignore[attr-defined]
    target.mkdir(parents=True)
    for name in chosen:
        shutil.copy(repo_folder / name, target / name)
    return target


def test_every_hub_model_the_docs_mention_has_a_recipe():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("packages/*/README.md"))]
    mentioned = {m for page in pages for m in HUB_ID.findall(page.read_text(encoding="utf-8"))}
    assert {"SmilingWolf/wd-vit-tagger-v3", "openai/clip-vit-large-patch14"} <= mentioned
    missing = sorted(mentioned - set(recipes()))
    assert not missing, f"hub models without an offline recipe in docs/offline-models.md: {missing}"
    for repo, recipe in recipes().items():
        assert recipe["local_dir"], f"{repo}: the recipe says which folder it makes"
    text = RECIPES.read_text(encoding="utf-8")
    assert "TorchDeepDanbooru/releases/download/v1/model-resnet_custom_v3.pt" in text  # not on the Hub
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "--local-dir ./wd-v3" in readme and "--model-dir ./wd-v3" in readme


@pytest.mark.parametrize("repo", ["SmilingWolf/wd-vit-tagger-v3", "SmilingWolf/wd-v1-4-convnext-tagger-v2"])
def test_wd_recipe_makes_the_folder_the_tagger_reads(tmp_path, repo):
    sys.path.insert(0, str(ROOT / "packages" / "sdplugin-taggers" / "tests"))
    from sdplugin_taggers.wd14 import WD14Tagger
    from wdmodels import make_wd_model, save_image

    hub = make_wd_model(tmp_path / "hub", v2="v2" in repo)
    (hub / "README.md").write_text("model card")
    (hub / "sw_jax_cv_config.json").write_text("{}")
    recipe = recipes()[repo]
    local = replay(hub, recipe, tmp_path / "local" / Path(str(recipe["local_dir"])).name)
    assert sorted(p.name for p in local.iterdir()) == ["model.onnx", "selected_tags.csv"]
    image = save_image(tmp_path / "img.png")
    result = WD14Tagger(local, providers="cpu").tag([image])[0]
    assert result.error is None and "1girl" in result.general


def _tiny_clip_repo(folder: Path) -> Path:
    import torch
    from sdcore.models.tiny import tiny_text_encoder_config
    from sdcore.models.tokenizer import bundled_clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}  # fmt: skip
    config = CLIPConfig(text_config=tiny_text_encoder_config("sd1"), vision_config=vision, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    bundled_clip_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("repo", ["openai/clip-vit-large-patch14", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"])
def test_clip_recipe_makes_a_folder_load_clip_reads(tmp_path, repo):
    from sdplugin_aesthetic.create import load_clip
    from transformers import CLIPTokenizer

    hub = _tiny_clip_repo(tmp_path / "hub")
    written = {p.name for p in hub.iterdir()}
    recipe = recipes()[repo]
    if recipe["files"]:  # everything transformers writes for a CLIPModel is named
        assert written <= set(recipe["files"]), sorted(written - set(recipe["files"]))
    for decoy in ("open_clip_pytorch_model.bin", "open_clip_config.json", "flax_model.msgpack", "tf_model.h5"):
        (hub / decoy).write_bytes(b"not needed")
    if recipe["files"]:
        for name in set(recipe["files"]) - written:  # the real repository's extra tokenizer files
            (hub / name).write_text("{}")
    local = replay(hub, recipe, tmp_path / "local")
    assert not {"open_clip_pytorch_model.bin", "flax_model.msgpack", "tf_model.h5"} & {p.name for p in local.iterdir()}
    for name in set(recipe["files"]) - written:  # drop the placeholders again: they are not ours to parse
        (local / name).unlink()
    model, processor = load_clip(local)
    assert model.config.projection_dim == 16 and processor is not None
    assert CLIPTokenizer.from_pretrained(local)("a cat").input_ids[0] == 49406


def test_blip_recipe_makes_a_folder_the_captioner_reads(tmp_path):
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    hub = tmp_path / "hub"
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "cat"]) + "\n")
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = dict(small, vocab_size=8, max_position_embeddings=32, bos_token_id=5, pad_token_id=0, eos_token_id=3,
                sep_token_id=3, decoder_start_token_id=5)  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(
        BlipConfig(text_config=text, vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    ).save_pretrained(hub)
    # laid out as the hub repository is (transformers 4 wrote it): preprocessor config + tokenizer files
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(hub)
    BertTokenizer(str(vocab), bos_token="[DEC]").save_pretrained(str(hub))
    # transformers 5 also writes these; loading does not need them (the load below runs without)
    written = {p.name for p in hub.iterdir()} - {"processor_config.json", "generation_config.json"}
    recipe = recipes()["Salesforce/blip-image-captioning-large"]
    assert written <= set(recipe["files"]), sorted(written - set(recipe["files"]))
    (hub / "pytorch_model.bin").write_bytes(b"not needed")
    (hub / "tf_model.h5").write_bytes(b"not needed")
    for name in set(recipe["files"]) - written:
        (hub / name).write_text("{}")
    local = replay(hub, recipe, tmp_path / "blip-large")
    for name in set(recipe["files"]) - written:
        (local / name).unlink()
    _, info = BlipForConditionalGeneration.from_pretrained(local, output_loading_info=True)
    assert not info["missing_keys"] and BlipProcessor.from_pretrained(local) is not None
