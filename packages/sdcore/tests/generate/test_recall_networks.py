"""``--from-png`` finds the PNG's LoRAs by its "Lora hashes" and reads kohya's AddNet fields (A1111's paste)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sdcore
import torch
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.generate.pnginfo import parse_parameters, save_png
from sdcore.generate.recall import recall_parameters
from sdcore.generate.recall_networks import addnet_tags, parse_lora_hashes, png_lora_hashes
from sdcore.models import hashes
from sdcore.models.hashes import autov3_hash, network_short_hash
from sdcore.models.peek import peek_file

# a real AddNet infotext's fields (kohya-ss/sd-webui-additional-networks writes "name(first 12 of the model hash)")
ADDNET = (
    "Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, AddNet Enabled: True, "
    "AddNet Model 1: NyaaCaster_v1(ee4e4abd6390), AddNet Model 2: fantasyfactory_v1(2245d4d0eedc), "
    "AddNet Model 3: KasuganoSora_ksV1(5cee7ac7fc52), AddNet Module 1: LoRA, AddNet Module 2: LoRA, "
    "AddNet Module 3: LoRA, AddNet Weight A 1: 0.25, AddNet Weight A 2: 0.5, AddNet Weight A 3: 0.1, "
    "AddNet Weight B 1: 0.25, AddNet Weight B 2: 0.7, AddNet Weight B 3: 0.1"
)


def _lora(sd1, path, seed):
    from sdplugin_lora.format import network_metadata, save_lora
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    network = LoraNetwork.create(ModuleIndex.from_bundle(sd1).select(conv=False), rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network:
            module.lora_down.weight.copy_(torch.randn(module.lora_down.weight.shape, generator=generator) * 0.5)
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_lora(path, network.state_dict(), network_metadata(family="sd1", rank=2, alpha=2.0), dtype="fp32")
    return path


def _read(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), parse_parameters(image.info["parameters"])


BASE = ("--steps", "1", "--size", "32x32", "--seed", "7")


def test_lora_hashes_field_parses_as_a1111_splits_it():
    assert parse_lora_hashes("x: 0123456789ab, my lora: ba9876543210,bad, :c") == {
        "x": "0123456789ab",
        "my lora": "ba9876543210",
    }
    assert png_lora_hashes({"Lora hashes": "a: 111111111111"}) == {"a": "111111111111"}


def test_relink_rewrites_only_lora_tags_with_an_entry(sd1, tmp_path):
    from sdcore.generate.recall_networks import _HashFinder, relink_loras
    from sdplugin_lora.apply import LoraHandler

    path = _lora(sd1, tmp_path / "Lora" / "x y.safetensors", 2)
    short = network_short_hash(path)
    finder = _HashFinder(LoraHandler(tmp_path / "Lora"))
    prompt = "<lora:a,b:0.5> <lora: old :te=1:unet=0.5> <lyco:old:1> <lora:old> <lora:nohash:1> <hypernet:old:1>"
    text, lines = relink_loras(prompt, {"ab": short, "old": short.upper(), "nohash": "000000000000"}, finder)
    assert text == "<lora:x y:0.5> <lora:x y:te=1:unet=0.5> <lyco:old:1> <lora:x y> <lora:nohash:1> <hypernet:old:1>"
    assert lines == [
        f"<lora:{n}> -> <lora:x y> (hash {short}, from the PNG's Lora hashes)" for n in ("a,b", "old", "old")
    ]


def test_network_short_hash_is_a1111s_and_the_infotext_writes_it(sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _lora(sd1, tmp_path / "x.safetensors", 1)  # sdcore writes kohya's sshs_model_hash: the addnet hash
    assert network_short_hash(path) == autov3_hash(path)[:12] == peek_file(path).metadata["sshs_model_hash"][:12]
    save_file(load_file(path), tmp_path / "y.safetensors", {"sshs_model_hash": "ABCDEF0123456789" * 4})
    assert network_short_hash(tmp_path / "y.safetensors") == "ABCDEF012345"  # kohya's stored hash wins, as written
    save_file(load_file(path), tmp_path / "w.safetensors", {"other": "1"})  # none stored: the addnet hash
    assert network_short_hash(tmp_path / "w.safetensors") == autov3_hash(path)[:12]
    torch.save({"a": torch.zeros(2)}, tmp_path / "z.pt")
    assert network_short_hash(tmp_path / "z.pt") == hashes.sha256_file(tmp_path / "z.pt")[:12]


def test_addnet_fields_become_tags_as_a1111_appends_them():
    parameters = parse_parameters("a cat\n" + ADDNET)
    recalled = recall_parameters(parameters)
    # networks.py infotext_pasted: "\n" then every tag, name without "(hash)", Weight A as the one multiplier
    assert recalled.values["prompt"] == (
        "a cat\n<lora:NyaaCaster_v1:0.25><lora:fantasyfactory_v1:0.5><lora:KasuganoSora_ksV1:0.1>"
    )
    # A1111 reads no Weight B: the one that differs from Weight A is said, the others are used
    assert [x for x in recalled.ignored if x.startswith("AddNet")] == ["AddNet Weight B 2: 0.7"]
    tags, used, found = addnet_tags(parameters.extra)
    assert tags == recalled.values["prompt"].split("\n")[1]
    assert {k for k in parameters.extra if k.startswith("AddNet")} - used == {"AddNet Weight B 2"}
    assert found == {
        "NyaaCaster_v1": "ee4e4abd6390",
        "fantasyfactory_v1": "2245d4d0eedc",
        "KasuganoSora_ksV1": "5cee7ac7fc52",
    }
    # a module other than LoRA is skipped (its fields stay "ignored"); no weight: 1.0; an 8-digit hash is no key
    extra = {"AddNet Module 1": "Hypernetwork", "AddNet Model 1": "h(0123456789ab)", "AddNet Module 2": "LoRA",
             "AddNet Model 2": "old(abcd1234)"}  # fmt: skip
    assert addnet_tags(extra) == ("<lora:old:1.0>", {"AddNet Module 2", "AddNet Model 2", "AddNet Weight A 2",
                                                    "AddNet Enabled"}, {})  # fmt: skip
    assert recall_parameters(parse_parameters("x\nSteps: 1, Seed: 1, Size: 8x8, AddNet Enabled: True")).ignored == [
        "AddNet Enabled: True"
    ]


def test_a_renamed_lora_is_found_by_its_hash_and_the_image_is_the_same(lora_cli, sd1, tmp_path, monkeypatch):
    loras = tmp_path / "Lora"
    _lora(sd1, loras / "style.safetensors", 3)
    first = tmp_path / "first.png"
    hires = (
        "--hr-scale",
        "1.5",
        "--hr-steps",
        "1",
        "--denoising-strength",
        "0.5",
        "--hr-prompt",
        "a dog <lora:style:0.5>",
    )
    result = lora_cli("a cat <lora:style:0.8>", *BASE, *hires, "--lora-dir", str(loras), "-o", str(first))
    assert result.exit_code == 0, result.output
    pixels, info = _read(first)
    short = network_short_hash(loras / "style.safetensors")
    assert info.extra["Lora hashes"] == f"style: {short}"

    (loras / "sub").mkdir()
    (loras / "style.safetensors").rename(loras / "sub" / "renamed.safetensors")
    _lora(sd1, loras / "other.safetensors", 4)  # another LoRA in the folder
    calls = []
    # the files the search hashes (generation's own "Lora hashes" go through the plugin's import, not counted)
    monkeypatch.setattr(hashes, "network_short_hash", lambda path: calls.append(path.name) or network_short_hash(path))
    again = tmp_path / "again.png"
    result = lora_cli("--from-png", str(first), "--lora-dir", str(loras), "-o", str(again))
    assert result.exit_code == 0, result.output
    line = f"<lora:style> -> <lora:renamed> (hash {short}, from the PNG's Lora hashes)"
    assert result.stderr.splitlines().count(line) == 2  # the prompt's tag and the hires prompt's
    again_pixels, again_info = _read(again)
    assert np.array_equal(pixels, again_pixels)  # the LoRA really applied, in both passes
    assert again_info.prompt == "a cat <lora:renamed:0.8>"
    assert again_info.extra["Hires prompt"] == "a dog <lora:renamed:0.5>"
    assert again_info.extra["Lora hashes"] == f"renamed: {short}"
    assert sorted(calls) == ["other.safetensors", "renamed.safetensors"]  # each file once, for both prompts

    # a PROMPT given on the command line is the user's: left as typed (and its missing LoRA is the usual error)
    result = lora_cli(
        "a cat <lora:style:0.8>", "--from-png", str(first), "--lora-dir", str(loras), "-o", str(tmp_path / "x.png")
    )
    assert isinstance(result.exception, sdcore.ConfigError) and "'style' not found" in str(result.exception)
    assert result.stderr.splitlines().count(line) == 1  # the PNG's hires prompt only

    # the name found with the PNG's hash: nothing else is hashed, nothing rewritten
    calls.clear()
    third = tmp_path / "third.png"
    assert lora_cli("a cat <lora:renamed:0.8>", *BASE, "--lora-dir", str(loras), "-o", str(third)).exit_code == 0
    calls.clear()
    result = lora_cli("--from-png", str(third), "--lora-dir", str(loras), "-o", str(tmp_path / "fourth.png"))
    assert result.exit_code == 0, result.output
    assert calls == ["renamed.safetensors"]  # lazily: the named file has the PNG's hash, no other file is read
    assert "->" not in result.stderr


def test_a_retrained_lora_gives_way_to_the_file_with_the_pngs_hash(lora_cli, sd1, tmp_path):
    # A1111 rewrites every tag whose hash a file has, even when the name still names a (different) file
    loras = tmp_path / "Lora"
    _lora(sd1, loras / "style.safetensors", 3)
    first = tmp_path / "first.png"
    assert lora_cli("a cat <lora:style:1>", *BASE, "--lora-dir", str(loras), "-o", str(first)).exit_code == 0
    pixels, _ = _read(first)
    (loras / "style.safetensors").rename(loras / "style_v1.safetensors")
    _lora(sd1, loras / "style.safetensors", 9)  # retrained under the old name
    again = tmp_path / "again.png"
    result = lora_cli("--from-png", str(first), "--lora-dir", str(loras), "-o", str(again))
    assert result.exit_code == 0, result.output
    assert "<lora:style> -> <lora:style_v1>" in result.stderr
    assert np.array_equal(pixels, _read(again)[0])


def test_a_hash_no_file_has_leaves_the_tag(lora_cli, sd1, tmp_path, monkeypatch):
    loras = tmp_path / "Lora"
    _lora(sd1, loras / "style.safetensors", 3)
    png = tmp_path / "a1111.png"
    save_png(Image.new("RGB", (8, 8)), png, "a cat <lora:gone:1>\nSteps: 1, Seed: 1, Size: 32x32, RNG: CPU, "
             'Lora hashes: "gone: 0123456789ab"')  # fmt: skip
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("must not load"))
    result = lora_cli("--from-png", str(png), "--lora-dir", str(loras), "-o", str(tmp_path / "o.png"))
    assert isinstance(result.exception, sdcore.ConfigError)
    assert "lora 'gone' not found" in str(result.exception) and "available: style" in str(result.exception)
    assert "->" not in result.stderr

    # the name is there with another hash: a warning, and that file is used
    monkeypatch.undo()
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: sd1)
    save_png(Image.new("RGB", (8, 8)), png, "a cat <lora:style:1>\nSteps: 1, Seed: 1, Size: 32x32, RNG: CPU, "
             'Lora hashes: "style: 0123456789ab"')  # fmt: skip
    out = tmp_path / "o.png"
    result = lora_cli("--from-png", str(png), "--lora-dir", str(loras), "-o", str(out))
    assert result.exit_code == 0, result.output
    own = network_short_hash(loras / "style.safetensors")
    assert result.stderr.splitlines() == [
        f"warning: the PNG's <lora:style> had hash 0123456789ab; {loras / 'style.safetensors'} has {own} and no "
        "LoRA file here has the PNG's"
    ]
    assert _read(out)[1].prompt == "a cat <lora:style:1>"


def test_addnet_png_applies_its_lora_found_by_the_addnet_hash(lora_cli, sd1, tmp_path):
    loras = tmp_path / "Lora"
    path = _lora(sd1, loras / "mine.safetensors", 5)
    short = network_short_hash(path)
    made = tmp_path / "made.png"
    assert lora_cli("a cat\n<lora:mine:0.7>", *BASE, "--lora-dir", str(loras), "-o", str(made)).exit_code == 0
    png = tmp_path / "addnet.png"
    save_png(Image.new("RGB", (8, 8)), png, "a cat\nSteps: 1, Sampler: Euler a, Seed: 7, Size: 32x32, RNG: CPU, "
             f"AddNet Enabled: True, AddNet Module 1: LoRA, AddNet Model 1: old_name({short}), "
             "AddNet Weight A 1: 0.7, AddNet Weight B 1: 0.7")  # fmt: skip
    out = tmp_path / "o.png"
    result = lora_cli("--from-png", str(png), "--cfg", "7", "--lora-dir", str(loras), "-o", str(out))
    assert result.exit_code == 0, result.output
    # the line names the field the hash came from: this PNG has no "Lora hashes"
    assert f"<lora:old_name> -> <lora:mine> (hash {short}, from the PNG's AddNet Model 1)" in result.stderr
    assert "ignored" not in result.stderr
    pixels, info = _read(out)
    assert info.prompt == "a cat\n<lora:mine:0.7>"
    assert np.array_equal(pixels, _read(made)[0])


def test_prompt_sr_searches_the_pngs_prompt_as_written_and_each_cell_is_relinked(lora_cli, sd1, tmp_path):
    # the trainer's epoch comparison on a recalled image: S/R names the tag the PNG shows (what `sdcore pnginfo`
    # prints), even when its hash now finds the LoRA under another name; each cell's prompt is relinked after it
    loras = tmp_path / "Lora"
    _lora(sd1, loras / "style.safetensors", 3)
    first = tmp_path / "first.png"
    assert lora_cli("a cat <lora:style:1>", *BASE, "--lora-dir", str(loras), "-o", str(first)).exit_code == 0
    (loras / "style.safetensors").rename(loras / "style_v1.safetensors")
    _lora(sd1, loras / "style.safetensors", 9)  # retrained under the old name
    _lora(sd1, loras / "style-000004.safetensors", 4)  # an epoch: no entry in the PNG's Lora hashes
    grid = tmp_path / "grid.png"
    result = lora_cli("--from-png", str(first), "--lora-dir", str(loras), "-o", str(grid),
                 "--x-type", "Prompt S/R", "--x-values", "<lora:style:1>,<lora:style:0.5>,<lora:style-000004:1>")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines().count("<lora:style> -> <lora:style_v1> (hash " + network_short_hash(
        loras / "style_v1.safetensors") + ", from the PNG's Lora hashes)") == 1  # fmt: skip
    prompts = [_read(tmp_path / f"grid-{i}.png")[1].prompt for i in range(3)]
    assert prompts == ["a cat <lora:style_v1:1>", "a cat <lora:style_v1:0.5>", "a cat <lora:style-000004:1>"]


def test_the_new_tag_names_the_file_by_the_first_text_that_resolves_to_it_and_never_holds_a_colon(
    sd1, tmp_path, monkeypatch
):
    from safetensors.torch import load_file
    from sdcore.generate.recall_networks import _HashFinder, relink_loras
    from sdplugin_lora.apply import LoraHandler

    root = tmp_path / "a:b"  # a ":" in the folder: as a Windows path's drive letter, it ends a tag's name
    loras = root / "Lora"
    one = _lora(sd1, loras / "one" / "x.safetensors", 2)
    _lora(sd1, loras / "two" / "x.safetensors", 3)
    torch.save(load_file(_lora(sd1, tmp_path / "y.safetensors", 4)), loras / "two" / "y.pt")
    _lora(sd1, loras / "y.safetensors", 5)
    short, pt_short = network_short_hash(one), network_short_hash(loras / "two" / "y.pt")
    hashes_ = {"old": short, "older": pt_short}
    monkeypatch.chdir(root)  # from here the file's path holds no ":"
    text, lines = relink_loras("<lora:old:1> <lora:older:0.5>", hashes_, _HashFinder(LoraHandler(loras)))
    # "x" and "x.safetensors" are both files' names, the absolute path holds ":"; "y.pt" is one file's name
    assert text == f"<lora:{Path('Lora', 'one', 'x.safetensors')}:1> <lora:y.pt:0.5>"
    assert lines[1] == f"<lora:older> -> <lora:y.pt> (hash {pt_short}, from the PNG's Lora hashes)"
    monkeypatch.chdir(tmp_path)  # every path to it holds ":": no tag can name it, the tag stays
    text, lines = relink_loras("<lora:old:1>", hashes_, _HashFinder(LoraHandler(loras)))
    assert text == "<lora:old:1>"
    assert lines == [
        f"warning: the PNG's <lora:old> has the hash of {one}, which no <lora:...> tag can name (rename the file); "
        "left as written"
    ]


def test_nothing_is_hashed_without_the_pngs_lora_hashes_or_when_the_prompts_are_typed(
    lora_cli, sd1, tmp_path, monkeypatch
):
    loras = tmp_path / "Lora"
    _lora(sd1, loras / "style.safetensors", 3)
    calls = []
    monkeypatch.setattr(hashes, "network_short_hash", lambda path: calls.append(path.name) or network_short_hash(path))
    png = tmp_path / "a1111.png"
    save_png(Image.new("RGB", (8, 8)), png, "a cat <lora:style:1>\nSteps: 1, Seed: 1, Size: 32x32, RNG: CPU")
    result = lora_cli("--from-png", str(png), "--lora-dir", str(loras), "-o", str(tmp_path / "o.png"))
    assert result.exit_code == 0, result.output
    assert calls == [] and _read(tmp_path / "o.png")[1].prompt == "a cat <lora:style:1>"
    save_png(Image.new("RGB", (8, 8)), png, "a cat <lora:style:1>\nSteps: 1, Seed: 1, Size: 32x32, RNG: CPU, "
             'Lora hashes: "style: 0123456789ab"')  # fmt: skip
    result = lora_cli(
        "a dog <lora:style:1>", "--from-png", str(png), "--lora-dir", str(loras), "-o", str(tmp_path / "p.png")
    )
    assert result.exit_code == 0, result.output
    assert calls == [] and "warning" not in result.stderr
    assert _read(tmp_path / "p.png")[1].prompt == "a dog <lora:style:1>"


def test_a_pngs_lora_hash_finds_a_file_in_the_lycoris_folder(lora_cli, sd1, tmp_path):
    """The relink searches the folders ``<lora:>`` does: a LoRA moved from ``Lora/`` into ``LyCORIS/`` beside it
    under another name is found by its hash (A1111 1.5+ hashes both folders' files), and the image is the same."""
    loras = tmp_path / "models" / "Lora"
    _lora(sd1, loras / "style.safetensors", 3)
    first = tmp_path / "first.png"
    assert lora_cli("a cat <lora:style:1>", *BASE, "--lora-dir", str(loras), "-o", str(first)).exit_code == 0
    pixels, _ = _read(first)
    moved = tmp_path / "models" / "LyCORIS" / "style_moved.safetensors"
    moved.parent.mkdir()
    (loras / "style.safetensors").rename(moved)
    again = tmp_path / "again.png"
    result = lora_cli("--from-png", str(first), "--lora-dir", str(loras), "-o", str(again))
    assert result.exit_code == 0, result.output
    assert "<lora:style> -> <lora:style_moved>" in result.stderr
    assert np.array_equal(pixels, _read(again)[0])
