"""``sdcore train`` with the model's parts in separate files (issue 19), through the CLI on tiny models.

A FLUX.1 transformer file in BFL's layout plus ``--clip-l --t5xxl --ae`` files, and an SD3 file with neither
text encoders nor VAE plus ``--clip-l --clip-g --t5xxl --vae``, train the very LoRA (bit for bit, same seed)
that the equivalent diffusers folder trains. The pre-flight names missing or wrong parts before any weight
loads, all at once, exit code 2; kohya's spellings (``--clip_l``, ``--ae``, a TOML's ``ae =``) work too.
"""

from __future__ import annotations

import pytest
import torch

#: the runs' common options (2 steps, 64 px, fp32 results so the comparison is of the trained numbers)
_COMMON = ["--max-steps", "2", "--resolution", "64", "--min-bucket-reso", "64", "--no-progress", "--save-dtype",
           "fp32", "--seed", "0", "--rank", "2", "--lr", "1e-2"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sdcore.testing.datasets import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("parts-data"), n=2, size=64)


def _save(tensors: dict[str, torch.Tensor], path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """tiny FLUX.1 dev as users have it: BFL's transformer file, clip_l, t5xxl and ae files; and as a diffusers folder."""
    from sdcore.models.flux.save import flux_state
    from sdcore.models.load import load_model

    root = tmp_path_factory.mktemp("flux-parts")
    bundle = load_model("tiny:flux")
    state = flux_state(bundle, "comfy")  # ComfyUI's all-in-one layout, cut into the files BFL/ComfyUI ship
    return {
        "folder": str(bundle.save(root / "folder", format="diffusers")),
        "model": _save(_strip(state, "model.diffusion_model."), root / "flux1-dev.safetensors"),
        "clip_l": _save(_strip(state, "text_encoders.clip_l.transformer."), root / "clip_l.safetensors"),
        "t5xxl": _save(_strip(state, "text_encoders.t5xxl.transformer."), root / "t5xxl_fp16.safetensors"),
        "ae": _save(_strip(state, "vae."), root / "ae.safetensors"),
    }


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    """tiny SD3 as SAI/ComfyUI users have it: the MMDiT without text encoders or VAE, and each part alone
    (T5 and the VAE as files, SAI's layouts)."""
    from safetensors.torch import load_file
    from sdcore.models.load import load_model
    from sdcore.models.sd3.save import write_sd3_single_file

    root = tmp_path_factory.mktemp("sd3-parts")
    bundle = load_model("tiny:sd3")
    full = load_file(str(write_sd3_single_file(bundle, root / "full.safetensors")))
    return {
        "folder": str(bundle.save(root / "folder", format="diffusers")),
        "model": _save(
            {k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}, root / "sd3_medium.safetensors"
        ),
        # the CLIPs as transformers folders: a CLIP file has no config, and its head count is read as width / 64,
        # right for CLIP-L (12) and CLIP-G (20) but not for the tiny ones (4 heads of 8), which would then
        # compute other numbers; the files' own reading is tested in packages/sdcore/tests/models/test_sd3.py
        "clip_l": _folder_of(bundle.text_encoders[0], root / "clip_l"),
        "clip_g": _folder_of(bundle.text_encoders[1], root / "clip_g"),
        "t5xxl": _save(_strip(full, "text_encoders.t5xxl.transformer."), root / "t5xxl_fp16.safetensors"),
        "vae": _save(_strip(full, "first_stage_model."), root / "sd3_vae.safetensors"),
    }


def _folder_of(module, folder):
    module.save_pretrained(folder)
    return folder


def _train(sd_cli, pm, model, data, out, *extra: str):
    args = ["train", "lora", "--model", str(model), "--data", str(data), "--output", str(out), *_COMMON, *extra]
    return sd_cli([str(a) for a in args], pm=pm)


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_identical(left, right) -> None:
    a, b = _tensors(left), _tensors(right)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_up" in k)  # it trained


@pytest.fixture
def owned_memory(monkeypatch):
    """Training loads the model into memory of its own (fresh, aligned allocations).

    diffusers' ``from_pretrained`` and sdcore's single-file reader map safetensors files into memory, so the
    weights sit at each file's own 8-byte-aligned offsets (a tensor converted from another layout, BFL's fused
    qkv, is a fresh allocation instead); CPU matmul kernels round differently for differently aligned weights
    (one Linear of tiny Flux: 1.3e-7 apart for bit-identical weights and input; 4.6e-6 in the LoRA after 2
    steps at lr 1e-2). With the layout made the same, the runs must agree bit for bit: what differs is then
    only what the files hold."""
    import sdcore.train.loop as loop

    load = loop.load_bundle

    def owned(*args, **kwargs):
        bundle = load(*args, **kwargs)
        for module in bundle.components().values():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.data = tensor.data.clone()
        return bundle

    monkeypatch.setattr(loop, "load_bundle", owned)


def test_flux_bfl_file_plus_parts_trains_the_folders_lora_bit_for_bit(flux_files, data, tmp_path, sd_cli, pm,
                                                                      owned_memory):  # fmt: skip
    f = flux_files
    from_folder = _train(sd_cli, pm, f["folder"], data, tmp_path / "folder.safetensors")
    assert from_folder.exit_code == 0, from_folder.output + repr(from_folder.exception)
    parts = ["--clip-l", f["clip_l"], "--t5xxl", f["t5xxl"], "--ae", f["ae"]]
    from_parts = _train(sd_cli, pm, f["model"], data, tmp_path / "parts.safetensors", *parts)
    assert from_parts.exit_code == 0, from_parts.output + repr(from_parts.exception)
    _assert_identical(tmp_path / "folder.safetensors", tmp_path / "parts.safetensors")
    # kohya's spellings of flux_train_network.py (--clip_l, --ae) and a kohya TOML's keys: the same run
    kohya = ["--clip_l", f["clip_l"], "--t5xxl", f["t5xxl"], "--ae", f["ae"]]
    result = _train(sd_cli, pm, f["model"], data, tmp_path / "kohya.safetensors", *kohya)
    assert result.exit_code == 0, result.output + repr(result.exception)
    _assert_identical(tmp_path / "folder.safetensors", tmp_path / "kohya.safetensors")


def test_sd3_file_without_text_encoders_and_vae_plus_parts_trains_the_folders_lora(
    sd3_files, data, tmp_path, sd_cli, pm, owned_memory
):
    f = sd3_files
    from_folder = _train(sd_cli, pm, f["folder"], data, tmp_path / "folder.safetensors")
    assert from_folder.exit_code == 0, from_folder.output + repr(from_folder.exception)
    # the VAE alone: SAI's ldm keys without the first_stage_model. prefix (16 latent channels)
    assert _tensors(f["vae"])["encoder.conv_out.weight"].shape[0] == 2 * 16
    parts = ["--clip-l", f["clip_l"], "--clip-g", f["clip_g"], "--t5xxl", f["t5xxl"], "--vae", f["vae"]]
    from_parts = _train(sd_cli, pm, f["model"], data, tmp_path / "parts.safetensors", *parts)
    assert from_parts.exit_code == 0, from_parts.output + repr(from_parts.exception)
    _assert_identical(tmp_path / "folder.safetensors", tmp_path / "parts.safetensors")
    # a diffusers AutoencoderKL folder as --vae: the same run again
    vae_folder = tmp_path / "folder-vae"
    vae_folder.symlink_to(f"{f['folder']}/vae", target_is_directory=True)
    parts[-1] = vae_folder
    from_vae_folder = _train(sd_cli, pm, f["model"], data, tmp_path / "vae-folder.safetensors", *parts)
    assert from_vae_folder.exit_code == 0, from_vae_folder.output + repr(from_vae_folder.exception)
    _assert_identical(tmp_path / "folder.safetensors", tmp_path / "vae-folder.safetensors")


def _refused(result) -> list[str]:
    """The error lines of a run the pre-flight stopped (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("Error: ")]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the run gets as far as loading a model: the pre-flight must stop it first."""
    import sdcore.train.loop as loop

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the pre-flight stopped the run")

    monkeypatch.setattr(loop, "load_bundle", refuse)


def test_preflight_names_missing_parts_in_one_line_before_loading(flux_files, sd3_files, data, tmp_path, sd_cli,
                                                                    pm, no_loading):  # fmt: skip
    f = flux_files
    # Flux transformer-only without --t5xxl: one clear line naming the missing part and its option
    lines = _refused(_train(sd_cli, pm, f["model"], data, tmp_path / "x.safetensors", "--clip-l", f["clip_l"],
                            "--ae", f["ae"]))  # fmt: skip
    assert lines == [f"Error: {f['model']} has no T5-XXL text encoder: pass --t5xxl <file or folder>"]
    # nothing given: every missing part in that one line
    lines = _refused(_train(sd_cli, pm, f["model"], data, tmp_path / "x.safetensors"))
    assert lines == [
        f"Error: {f['model']} has no CLIP-L text encoder, T5-XXL text encoder, VAE: pass --clip-l <file or folder> "
        "--t5xxl <file or folder> --vae <file or folder>"
    ]
    # SD3 without a VAE: refused with the option that supplies it
    s = sd3_files
    encoders = ["--clip-l", s["clip_l"], "--clip-g", s["clip_g"], "--t5xxl", s["t5xxl"]]
    lines = _refused(_train(sd_cli, pm, s["model"], data, tmp_path / "x.safetensors", *encoders))
    assert lines == [f"Error: {s['model']} has no VAE: pass --vae <file or folder>"]


def test_preflight_reports_every_wrong_part_at_once(flux_files, data, tmp_path, sd_cli, pm, no_loading):
    f = flux_files
    missing = tmp_path / "nowhere" / "t5xxl.safetensors"
    args = ["--clip-l", f["t5xxl"], "--t5xxl", missing, "--ae", f["ae"], "--clip-g", f["clip_l"]]
    lines = _refused(_train(sd_cli, pm, f["model"], data, tmp_path / "x.safetensors", *args, "--lr", "-1"))
    assert f"Error: --clip-l {f['t5xxl']}: not a CLIP-L text encoder file (no tensor named like " \
           "...text_model.final_layer_norm.weight); it holds a T5-XXL text encoder alone: give it with --t5xxl to a " \
           "model file that lacks it" in lines  # fmt: skip
    assert f"Error: --t5xxl {missing}: no such file or folder (the T5-XXL text encoder)" in lines
    assert any(line.startswith("Error: --clip-g: not a part of this FLUX.1 (flux) file") for line in lines), lines
    assert "Error: --lr must be positive, got -1.0" in lines  # the other options' problems come with them
    assert len(lines) == 4, lines
    # a built-in tiny model is complete: parts do not apply
    lines = _refused(_train(sd_cli, pm, "tiny:flux", data, tmp_path / "x.safetensors", "--t5xxl", f["t5xxl"]))
    assert lines == ["Error: --t5xxl: separate parts apply to model files and folders, not tiny:flux"]


def test_parts_in_a_config_file_sdcore_and_kohya_names(flux_files, tmp_path):
    """``--config``: sdcore's keys (``clip_l``, ``t5xxl``, ``vae``, or with dashes) and kohya's
    (``[model_arguments] ae =``) set the same options; ``--save-config`` writes them back."""
    from sdcore.train.config import dump_options, load_options
    from sdplugin_lora.method import LoraOptions

    f = flux_files
    ours = tmp_path / "ours.toml"
    ours.write_text(f'model = "{f["model"]}"\nclip-l = "{f["clip_l"]}"\nt5xxl = "{f["t5xxl"]}"\nvae = "{f["ae"]}"\n')
    kohya = tmp_path / "kohya.toml"
    kohya.write_text(f'[model_arguments]\npretrained_model_name_or_path = "{f["model"]}"\nclip_l = "{f["clip_l"]}"\n'
                     f't5xxl = "{f["t5xxl"]}"\nae = "{f["ae"]}"\n')  # fmt: skip
    a, b = load_options(LoraOptions, ours, notes=[]), load_options(LoraOptions, kohya, notes=[])
    for options in (a, b):
        assert (options.clip_l, options.t5xxl, options.vae) == (str(f["clip_l"]), str(f["t5xxl"]), str(f["ae"]))
        assert options.clip_g is None
    text = dump_options(a, tmp_path / "saved.toml")
    assert f'vae = "{f["ae"]}"' in text and load_options(LoraOptions, tmp_path / "saved.toml", notes=[]) == a


def test_sd1_vae_replaces_the_models_own_in_loading_and_training(data, tmp_path, sd_cli, pm, owned_memory):
    """SD1/SDXL take one part, ``--vae`` (kohya's meaning: a VAE that replaces the model's own). A VAE file in
    the ldm layout (with or without ``first_stage_model.``) or a diffusers VAE folder loads into the bundle
    bit for bit, and training with ``--vae`` trains the LoRA that the model with that VAE built in trains."""
    from safetensors.torch import load_file
    from sdcore.models.load import load_model

    base = load_model("tiny:sd1")
    model = base.save(tmp_path / "base.safetensors")
    other = load_model("tiny:sd1")
    with torch.no_grad():
        for tensor in other.vae.parameters():
            tensor.add_(0.01)  # another VAE of the same shape (a fine-tuned one, as vae-ft-mse is)
    with_other = other.save(tmp_path / "with-other-vae.safetensors")
    ldm = {k: v for k, v in load_file(str(with_other)).items() if k.startswith("first_stage_model.")}
    files = {"prefixed": _save(ldm, tmp_path / "vae-prefixed.safetensors"),
             "bare": _save(_strip(ldm, "first_stage_model."), tmp_path / "vae.safetensors")}  # fmt: skip
    other.vae.save_pretrained(tmp_path / "vae-folder")
    folder = base.save(tmp_path / "base-folder")
    expected = other.vae.state_dict()
    for source in (*files.values(), tmp_path / "vae-folder"):
        for loaded in (load_model(str(model), vae=str(source)), load_model(str(folder), vae=str(source))):
            got = loaded.vae.state_dict()
            assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), source
            assert torch.equal(loaded.unet.conv_in.weight, base.unet.conv_in.weight)

    plain = _train(sd_cli, pm, with_other, data, tmp_path / "built-in.safetensors")
    assert plain.exit_code == 0, plain.output + repr(plain.exception)
    given = _train(sd_cli, pm, model, data, tmp_path / "given.safetensors", "--vae", files["bare"])
    assert given.exit_code == 0, given.output + repr(given.exception)
    _assert_identical(tmp_path / "built-in.safetensors", tmp_path / "given.safetensors")
    without = _train(sd_cli, pm, model, data, tmp_path / "own.safetensors")
    assert without.exit_code == 0
    a, b = _tensors(tmp_path / "own.safetensors"), _tensors(tmp_path / "given.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the VAE changed what was learnt
