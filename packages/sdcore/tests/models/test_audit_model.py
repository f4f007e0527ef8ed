"""What an A1111/kohya user tripped on with ``sdcore model convert`` and ``create-tiny`` (a newcomer's audit).

``model convert model.safetensors model.ckpt`` (A1111's suffix) wrote a diffusers *folder* named model.ckpt, and
``model convert a.safetensors a.safetensors --dtype fp16`` replaced the source with its fp16 copy, the original
lost. A pickle suffix is now refused before the model is read (``--to diffusers`` still names a folder as the user
likes), and DST is never SRC or a part file the model is read from; an earlier model at DST is replaced only with
``--overwrite``, as the lora tools' outputs are.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from sdcore.builtin import model_commands
from sdcore.errors import ConfigError, SdcoreError


def _run(*args):
    return CliRunner().invoke(model_commands.model_group, [str(a) for a in args])


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".CKPT"])
def test_a_pickle_suffix_is_refused_not_made_a_folder(tmp_path, suffix):
    dst = tmp_path / f"model{suffix}"
    for args in (("convert", tmp_path / "no-such-model", dst), ("create-tiny", dst)):  # before SRC is read
        result = _run(*args)
        assert isinstance(result.exception, SdcoreError), (result.exception, result.output)
        message = str(result.exception)
        assert message.startswith(f"{dst}: single files are written as .safetensors"), message
        assert f"use {tmp_path / 'model.safetensors'}" in message and "\n" not in message
        assert not dst.exists()
    # what the rule says for other names, and an explicit format wins
    from sdcore.models.save import save_format

    assert save_format(tmp_path / "m.safetensors") == "single-file" and save_format(tmp_path / "m.sft") == "single-file"
    assert save_format(tmp_path / "folder") == "diffusers" and save_format(dst, "diffusers") == "diffusers"


def test_convert_never_replaces_its_source(tmp_path):
    src = tmp_path / "m.safetensors"
    assert _run("create-tiny", src).exit_code == 0
    before = src.read_bytes()
    for dst in (src, tmp_path / "sub" / ".." / "m.safetensors"):
        result = _run("convert", src, dst, "--dtype", "fp16")
        assert isinstance(result.exception, ConfigError), (result.exception, result.output)
        assert str(result.exception) == (
            f"DST {dst} is the input {src}: the result cannot replace a file it is made from; choose another DST"
        )
    assert src.read_bytes() == before
    # a part file given beside the model is an input as well
    vae = tmp_path / "vae.safetensors"
    assert _run("create-tiny", tmp_path / "other.safetensors").exit_code == 0
    vae.write_bytes((tmp_path / "other.safetensors").read_bytes())
    result = _run("convert", src, vae, "--vae", vae)
    assert isinstance(result.exception, ConfigError) and f"DST {vae} is the input {vae}" in str(result.exception)
    # an earlier result at DST is replaced with --overwrite only
    out = tmp_path / "out.safetensors"
    assert _run("convert", src, out, "--dtype", "fp16").exit_code == 0
    result = _run("convert", src, out, "--overwrite")
    assert result.exit_code == 0, result.output


def test_an_earlier_model_at_dst_is_kept_unless_overwrite(tmp_path, monkeypatch):
    """``model convert SRC DST`` and ``create-tiny DST`` replaced an existing DST (a file, or an earlier diffusers
    folder) in silence, where ``lora merge/resize/extract`` refuse it unless --overwrite: now the same rule, said
    before the model is read."""
    import sdcore.models.load as load_module

    src = tmp_path / "m.safetensors"
    assert _run("create-tiny", src).exit_code == 0
    single, folder = tmp_path / "out.safetensors", tmp_path / "out-diffusers"
    assert _run("convert", src, single).exit_code == 0 and _run("convert", src, folder).exit_code == 0
    kept = {single: single.read_bytes(), folder: (folder / "model_index.json").read_bytes()}

    def refuse(*args, **kwargs):
        raise AssertionError("the model was read")

    monkeypatch.setattr(load_module, "load_model", refuse)
    for args, dst in (
        (("convert", src, single, "--dtype", "fp16"), single),
        (("convert", src, folder), folder),
        (("create-tiny", single, "--seed", "1"), single),
        (("create-tiny", folder), folder),
    ):
        result = _run(*args)
        assert isinstance(result.exception, ConfigError), (args, result.exception, result.output)
        assert str(result.exception) == f"{dst} already exists; pass --overwrite to replace it, or choose another DST"
    monkeypatch.undo()
    assert single.read_bytes() == kept[single] and (folder / "model_index.json").read_bytes() == kept[folder]
    for args in (("convert", src, single, "--dtype", "fp16"), ("convert", src, folder), ("create-tiny", single)):
        result = _run(*args, "--overwrite")
        assert result.exit_code == 0, (args, result.output)
    assert single.read_bytes() != kept[single]
    # a folder of other things is refused whatever --overwrite says: no advice to pass it
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = _run("convert", src, other)
    assert "--overwrite" not in str(result.exception) and "is not a diffusers model" in str(result.exception)


def test_a_lora_or_embedding_given_as_the_model_says_what_it_is(tmp_path):
    """A LoRA or an embedding passed to ``model info`` (or generate's --model) got "not a Stable Diffusion
    checkpoint (no model.diffusion_model...)" alone; the message now says what the file is and where it goes."""
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "mychar.safetensors"
    save_file(
        {
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2),
            "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
        },
        str(lora),
    )
    embedding = tmp_path / "style.safetensors"
    save_file({"emb_params": torch.zeros(2, 768)}, str(embedding))
    other = tmp_path / "other.safetensors"
    save_file({"something": torch.zeros(2)}, str(other))
    for path, expected in (
        (lora, "; it is a LoRA, not a model: `sdcore lora info` describes it, <lora:NAME:1> in a prompt"),
        (embedding, "; it is a textual-inversion embedding, not a model: write its name in a prompt"),
    ):
        result = _run("info", path, "--no-hash")
        assert isinstance(result.exception, SdcoreError), (result.exception, result.output)
        assert str(result.exception).startswith(f"{path}: not a Stable Diffusion checkpoint")
        assert expected in str(result.exception)
    result = _run("info", other, "--no-hash")
    assert isinstance(result.exception, SdcoreError) and "it is a" not in str(result.exception)


def test_a_family_name_in_capitals_is_the_family(tmp_path):
    """``--family SDXL`` (as the family is written in prose) was "unknown model family 'SDXL'"."""
    from safetensors import safe_open
    from sdcore.models.load import tiny_family

    assert tiny_family("SDXL") == ("sdxl", {}) and tiny_family(" Flux-Schnell ") == ("flux", {"variant": "schnell"})
    result = _run("create-tiny", tmp_path / "t.safetensors", "--family", "SD2")
    assert result.exit_code == 0, result.output
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert any(key.startswith("cond_stage_model.model.") for key in names)  # an SD2 layout: its OpenCLIP text model


def test_a_diffusers_dst_that_cannot_be_written_is_refused_before_the_model_is_read(tmp_path, monkeypatch):
    """``model convert big.safetensors ~/models`` (a folder of the user's files) read the whole model first and
    only then said the folder is not a diffusers model; and a diffusers DST holding SRC (or a part it reads) was
    replaced whole, the source file inside it deleted with the earlier model."""
    import sdcore.models.load as load_module

    src = tmp_path / "m.safetensors"
    assert _run("create-tiny", src).exit_code == 0
    models = tmp_path / "models"
    models.mkdir()
    (models / "keep.safetensors").write_bytes(b"the user's")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was read")

    monkeypatch.setattr(load_module, "load_model", refuse)
    result = _run("convert", src, models)
    assert isinstance(result.exception, SdcoreError), (result.exception, result.output)
    assert str(result.exception).startswith(f"{models}: the folder exists and is not a diffusers model")
    monkeypatch.undo()
    folder = tmp_path / "diffusers"
    assert _run("convert", src, folder).exit_code == 0
    inner = folder / "unet" / "diffusion_pytorch_model.safetensors"
    kept = folder / "vae.safetensors"
    assert _run("create-tiny", kept).exit_code == 0
    before = kept.read_bytes()
    result = _run("convert", kept, folder)
    assert isinstance(result.exception, ConfigError), (result.exception, result.output)
    assert str(result.exception) == (
        f"DST {folder} holds the input {kept}: replacing the folder would delete it; choose another DST"
    )
    assert kept.read_bytes() == before and inner.is_file()


def test_an_a1111_pt_embedding_given_as_the_model_says_what_it_is(tmp_path):
    """A1111's own embedding file (``style.pt``: its vectors under ``string_to_param``, a dict, beside ``name`` and
    ``step``) got the bare "not a Stable Diffusion checkpoint": the embedding hint read only top-level tensors."""
    import torch

    embedding = tmp_path / "style.pt"
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.zeros(2, 768)},
            "name": "style",
            "step": 1000,
            "sd_checkpoint": "abc",
            "sd_checkpoint_name": "v1-5",
        },
        embedding,
    )
    result = _run("info", embedding, "--no-hash")
    assert isinstance(result.exception, SdcoreError), (result.exception, result.output)
    assert str(result.exception) == (
        f"{embedding}: not a model checkpoint; it is a textual-inversion embedding, not a model: write its name in a "
        "prompt (--embeddings-dir)"
    )


def test_an_a1111_hypernetwork_given_as_the_model_says_what_it_is(tmp_path):
    """A1111's hypernetwork file (its layers under the attention widths 768, 320 ..., beside ``layer_structure``,
    ``name`` and ``step``; older ones without ``layer_structure``) got the bare "not a model checkpoint"."""
    import torch

    layers = [{"linear.0.weight": torch.zeros(4, 2)}, {"linear.0.weight": torch.zeros(4, 2)}]
    for name, extra in (("new", {"layer_structure": [1, 2, 1], "activation_func": "linear"}), ("old", {})):
        network = tmp_path / f"{name}.pt"
        torch.save({768: layers, 320: layers, "name": name, "step": 500, **extra}, network)
        result = _run("info", network, "--no-hash")
        assert isinstance(result.exception, SdcoreError), (result.exception, result.output)
        assert str(result.exception) == (
            f"{network}: not a model checkpoint; it is a hypernetwork, not a model: <hypernet:NAME:1> in a prompt "
            "applies it (--hypernetwork-dir)"
        )
