"""What a kohya/A1111 user tripped on with ``sdcore lora ...`` (a newcomer's audit).

``-o mychar.pt`` (A1111's old LoRA suffix) wrote safetensors bytes under a pickle name: A1111, ComfyUI and
``sdcore lora info`` itself then failed to read the file. A LoRA output must be named ``.safetensors``; the
refusal comes before any model is read (``merge --model`` writes a model: ``sdcore model convert``'s rule).
"""

from __future__ import annotations

from lora_testutil import refusal as _refused
from lora_testutil import run_lora_command as _run
from lora_testutil import saved_lora as _lora
from sdcore.errors import SdcoreError


def test_a_lora_output_not_named_safetensors_is_refused_before_any_work(tmp_path):
    source = _lora(tmp_path)
    missing = tmp_path / "no-such-model"  # would fail if it were read: the refusal comes first
    for out, name in (("mychar.pt", "mychar"), ("mychar.ckpt", "mychar"), ("mychar", "mychar"), ("a.v2", "a.v2")):
        target = tmp_path / out
        for args in (
            ("resize", source, "-o", target, "--rank", "2", "--base-model", missing),
            ("extract", "tiny:sd1", missing, "-o", target),
            ("merge", source, "-o", target, "--base-model", missing),
            ("convert", source, "-o", target, "--to", "comfyui"),
        ):
            message = _refused(_run(*args))
            assert message.startswith(f"-o {target}: sdcore writes LoRA files as .safetensors"), message
            assert message.endswith(f"use -o {tmp_path / name}.safetensors"), message
        assert not target.exists()
    assert "as a pickle" in _refused(_run("resize", source, "-o", tmp_path / "x.pt", "--rank", "2"))
    # merging into a model writes a model: a .ckpt name is refused before the merge, a folder name is a folder
    result = _run("merge", source, "--model", missing, "-o", tmp_path / "merged.ckpt")
    assert isinstance(result.exception, SdcoreError) and "single files are written as .safetensors" in str(
        result.exception
    ), (result.exception, result.output)
    # a .safetensors LoRA is written as before, whatever the suffix's case
    good = tmp_path / "small.SAFETENSORS"
    assert _run("resize", source, "-o", good, "--rank", "2").exit_code == 0 and good.is_file()


def test_a_model_checkpoint_given_as_the_lora_says_what_it_is(tmp_path):
    """``sdcore lora info|resize model.safetensors`` listed the checkpoint's first five key names; it names the
    model instead (a model part: what it holds); any other file keeps the key list."""
    from sdcore.models.load import load_model

    model = load_model("tiny:sd1").save(tmp_path / "model.safetensors")
    for args in (("info", model), ("resize", model, "-o", tmp_path / "small.safetensors", "--rank", "2")):
        result = _run(*args)
        assert isinstance(result.exception, SdcoreError), (result.exception, result.output)
        assert str(result.exception) == (
            f"{model}: no LoRA modules: it is a sd1 model checkpoint (`sdcore model info` describes it)"
        )
    import torch
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"something": torch.zeros(2)}, str(other))
    assert str(_run("info", other).exception) == f"{other}: no LoRA modules found (first keys: something)"


def test_merge_into_a_model_refuses_a_diffusers_folder_it_cannot_write_before_the_model_is_read(tmp_path):
    """``merge --model`` writes a model as ``sdcore model convert`` does, and takes its rule: ``-o ~/models
    --overwrite`` (a folder of other files) read the model and merged before saying the folder is no diffusers
    model, and an ``-o`` diffusers folder holding the ``--model`` file replaced it, the source deleted with it."""
    source = _lora(tmp_path)
    missing = tmp_path / "no-such-model"  # would fail if it were read: the refusal comes first
    models = tmp_path / "models"
    models.mkdir()
    (models / "keep.safetensors").write_bytes(b"the user's")
    message = _refused(_run("merge", source, "--model", missing, "-o", models, "--overwrite"))
    assert message.startswith(f"{models}: the folder exists and is not a diffusers model"), message
    folder = tmp_path / "diffusers"
    from sdcore.models.load import load_model

    load_model("tiny:sd1").save(folder)
    inner = load_model("tiny:sd1").save(folder / "inner.safetensors")
    before = inner.read_bytes()
    message = _refused(_run("merge", source, "--model", inner, "-o", folder, "--overwrite"))
    assert message == f"-o {folder} holds the input {inner}: replacing the folder would delete it; choose another -o"
    assert inner.read_bytes() == before


def test_extract_of_one_model_as_base_and_tuned_is_refused_before_either_is_read(tmp_path, monkeypatch):
    """``extract model.safetensors model.safetensors`` (or the same file through a link) read the model twice, took
    the SVD of nothing and only then said "nothing to extract"; the same place is said at once."""
    import os

    import sdplugin_lora.commands as commands
    from sdcore.models.load import load_model

    model = load_model("tiny:sd1").save(tmp_path / "model.safetensors")
    os.link(model, tmp_path / "linked.safetensors")

    def refuse(source):
        raise AssertionError(f"{source} was read")

    monkeypatch.setattr(commands, "_load_model", refuse)
    for base, tuned in ((model, model), (model, tmp_path / "linked.safetensors"), ("tiny:sd1", "tiny:sd1")):
        out = tmp_path / "x.safetensors"
        message = _refused(_run("extract", base, tuned, "-o", out))
        assert message == (
            f"BASE {base} and TUNED {tuned} are the same model: nothing to extract; give the fine-tune as TUNED"
        )
        assert not out.exists()
