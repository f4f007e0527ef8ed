"""Separate model parts checked from headers (:mod:`sdcore.models.parts`): each part file is there and is
that part, the model takes it, and the model file plus the parts make a complete model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _save(tensors, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """tiny Flux dev: its diffusers folder, BFL's transformer file, and CLIP-L / T5 / AE files."""
    from sdcore.models.flux.save import flux_state
    from sdcore.models.load import load_model

    root = tmp_path_factory.mktemp("flux")
    bundle = load_model("tiny:flux")
    state = flux_state(bundle, "comfy")

    def part(prefix, name):
        return _save({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, root / name)

    return {
        "folder": bundle.save(root / "folder", format="diffusers"),
        "comfy": _save(state, root / "comfy.safetensors"),
        "model": part("model.diffusion_model.", "flux1-dev.safetensors"),
        "clip_l": part("text_encoders.clip_l.transformer.", "clip_l.safetensors"),
        "t5xxl": part("text_encoders.t5xxl.transformer.", "t5xxl_fp16.safetensors"),
        "ae": part("vae.", "ae.safetensors"),
    }


def test_given_parts_from_options_or_a_mapping():
    from sdcore.models.parts import given_parts
    from sdcore.train.options import TrainOptions

    options = TrainOptions(model="m", clip_l="a", t5xxl="", vae="c")
    assert given_parts(options) == {"clip_l": "a", "vae": "c"}
    assert given_parts({"t5_tokenizer": "tok", "clip_g": None, "other": 1}) == {"t5_tokenizer": "tok"}


def test_part_files_there_readable_and_of_their_kind(flux, tmp_path):
    from sdcore.models.parts import part_file_problems

    assert part_file_problems({"clip_l": flux["clip_l"], "t5xxl": flux["t5xxl"], "vae": flux["ae"]}) == []
    assert part_file_problems({"clip_l": flux["folder"] / "text_encoder", "vae": flux["folder"]}) == []
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    problems = part_file_problems({
        "clip_l": tmp_path / "missing.safetensors",  # not there
        "t5xxl": flux["clip_l"],  # a CLIP file given as T5
        "vae": garbage,  # unreadable header
        "t5_tokenizer": flux["t5xxl"],  # a file where the tokenizer's folder is asked for
    })  # fmt: skip
    assert (
        problems[0] == f"--clip-l {tmp_path / 'missing.safetensors'}: no such file or folder (the CLIP-L text encoder)"
    )
    assert problems[1].startswith(f"--t5xxl {flux['clip_l']}: not a T5-XXL text encoder file (no tensor named like")
    assert problems[2].startswith(f"--vae {garbage}: ") and "safetensors" in problems[2]
    assert (
        problems[3]
        == f"--t5-tokenizer {flux['t5xxl']}: give the tokenizer's folder (with tokenizer.json or spiece.model)"
    )
    assert len(problems) == 4


def test_part_files_of_any_name_are_read_before_the_load_and_say_what_they_are(flux, tmp_path):
    """``--vae junk.bin``: a file under a pickle's or no known name is read as the loader reads it (the safe
    pickle reader, no code run) and refused in the pre-flight, and a LoRA or a CLIP file given as a VAE says what
    it is; the load would otherwise be the first to find out."""
    from sdcore.models.parts import part_file_problems

    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(200, 256)) * 40)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    lora = {"lora_unet_a.lora_down.weight": torch.zeros(2, 2), "lora_unet_a.lora_up.weight": torch.zeros(2, 2)}
    torch.save(lora, tmp_path / "lora.bin")
    _save(lora, tmp_path / "lora.safetensors")
    renamed = tmp_path / "ae"  # no suffix: the loader sniffs it as safetensors
    renamed.write_bytes(flux["ae"].read_bytes())
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.pt")
    assert part_file_problems({"vae": renamed}) == []
    assert part_file_problems({"vae": tmp_path / "vae.pt"}) == []
    assert part_file_problems({"vae": junk}) == [
        f"--vae {junk}: not a readable VAE file: not a torch file (no zip and no pickle: byte 0xc8 is no pickle "
        "instruction)"
    ]
    assert part_file_problems({"t5xxl": empty}) == [
        f"--t5xxl {empty}: not a readable T5-XXL text encoder file: not a torch file (the file is empty)"
    ]
    for name in ("lora.bin", "lora.safetensors"):
        (line,) = part_file_problems({"vae": tmp_path / name})
        assert line.startswith(
            f"--vae {tmp_path / name}: not a VAE file (no tensor named like ...encoder.conv_in.weight); it is a LoRA"
        )
    (line,) = part_file_problems({"vae": flux["clip_l"]})
    assert line.endswith("; it holds a CLIP-L text encoder / CLIP-G text encoder alone: give it with --clip-l or "
                         "--clip-g to a model file that lacks it")  # fmt: skip


def test_train_dry_run_and_generate_refuse_a_junk_vae_before_the_model_loads(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    main = build_cli(get_plugin_manager())
    model = load_model("tiny:sd1").save(tmp_path / "sd1.safetensors")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(200, 256)) * 40)
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64)).save(data / "a.png")
    (data / "a.txt").write_text("a cat")
    line = f"--vae {junk}: not a readable VAE file: not a torch file ("
    train = ["train", "lora", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o.safetensors"),
             "--resolution", "64", "--min-bucket-reso", "64", "--vae", str(junk), "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(main, train)
    assert result.exit_code == 2 and line in result.output, result.output
    result = CliRunner().invoke(main, ["generate", "cat", "--model", str(model), "--vae", str(junk), "--steps", "1",
                                       "-o", str(tmp_path / "x.png")])  # fmt: skip
    assert result.exit_code == 2 and line in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()


def test_flux_slots_from_the_header_and_the_folder(flux):
    from sdcore.models.flux.load import TAKES_PARTS, flux_part_slots

    assert flux_part_slots(flux["model"]) == (TAKES_PARTS, ("clip_l", "t5xxl", "vae"))
    assert flux_part_slots(flux["comfy"]) == (TAKES_PARTS, ())
    assert flux_part_slots(flux["folder"]) == (TAKES_PARTS, ())


def test_model_plus_parts_complete_or_one_line_naming_what_is_missing(flux, tmp_path):
    from sdcore.models.load import load_model
    from sdcore.models.parts import part_problems

    model = str(flux["model"])
    complete = {"clip_l": flux["clip_l"], "t5xxl": flux["t5xxl"], "vae": flux["ae"]}
    assert part_problems(model, complete) == []
    assert part_problems(model, {k: v for k, v in complete.items() if k != "t5xxl"}) == [
        f"{model} has no T5-XXL text encoder: pass --t5xxl <file or folder>"
    ]
    assert part_problems(str(flux["comfy"]), {}) == []  # ComfyUI's all-in-one file has every part
    assert part_problems(str(flux["folder"]), {"vae": flux["ae"]}) == []  # a Flux folder takes replacements
    # a family without separate parts (SD1 here), an SD3 diffusers folder, and a built-in tiny model
    sd1 = load_model("tiny:sd1").save(tmp_path / "sd1.safetensors")
    assert part_problems(str(sd1), {"clip_l": flux["clip_l"], "vae": flux["ae"]}) == [
        f"--clip-l: not a part of this Stable Diffusion 1.x (sd1) file {sd1} (it takes --vae)",
        f"--vae {flux['ae']}: a VAE with 16 latent channels; Stable Diffusion 1.x needs its 4-channel VAE",
    ]
    sd3 = load_model("tiny:sd3").save(tmp_path / "sd3", format="diffusers")
    problems = part_problems(str(sd3), {"clip_l": flux["clip_l"]})
    assert problems == [f"--clip-l: not a part of this Stable Diffusion 3 / 3.5 (sd3) diffusers folder {sd3} "
                        "(it takes no separate parts)"]  # fmt: skip
    assert part_problems("tiny:flux", {"t5xxl": flux["t5xxl"]}) == [
        "--t5xxl: separate parts apply to model files and folders, not tiny:flux"
    ]
    assert part_problems(str(tmp_path / "nowhere.safetensors"), {}) == []  # the model check's own line


def test_a_vae_of_other_latent_channels_is_refused_from_its_header_and_at_load(flux, tmp_path):
    """An SD1/SDXL VAE (4 latent channels) for a 16-channel family: the pre-flight says so from the header
    or config, and SD3's reader refuses it before the transformer would fail on the shapes."""
    from sdcore.errors import ModelFormatError
    from sdcore.models.load import load_model
    from sdcore.models.parts import part_problems, vae_latent_channels
    from sdcore.models.sd3.load import read_sd3_single_file

    sd1_vae = tmp_path / "sd1-vae"
    load_model("tiny:sd1").vae.save_pretrained(sd1_vae)
    assert (vae_latent_channels(flux["ae"]), vae_latent_channels(flux["folder"])) == (16, 16)
    assert vae_latent_channels(sd1_vae) == 4
    complete = {"clip_l": flux["clip_l"], "t5xxl": flux["t5xxl"]}
    assert part_problems(str(flux["model"]), {**complete, "vae": sd1_vae}) == [
        f"--vae {sd1_vae}: a VAE with 4 latent channels; FLUX.1 needs its 16-channel VAE"
    ]
    from safetensors.torch import load_file, save_file

    sd3 = load_model("tiny:sd3")
    full = load_file(str(sd3.save(tmp_path / "sd3.safetensors")))
    bare = tmp_path / "sd3-no-vae.safetensors"
    save_file({k: v for k, v in full.items() if not k.startswith("first_stage_model.")}, str(bare))
    with pytest.raises(ModelFormatError, match="a VAE with 4 latent channels"):
        read_sd3_single_file(bare, vae=sd1_vae)
    sd3.vae.save_pretrained(tmp_path / "sd3-vae")
    assert read_sd3_single_file(bare, vae=tmp_path / "sd3-vae").vae.config.latent_channels == 16


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_layout_of_a_file_plus_parts_counts_the_models_parameters(flux, tmp_path):
    """The pre-flight's memory plan of a file that lacks parts sizes the parts given (their headers or
    configs), not the released sizes: its meta-device model counts what the plan of the loaded model counts."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.layout import LayoutUnavailableError, layout_of_bundle, meta_bundle, read_layout
    from sdcore.models.load import load_model

    parts = {"clip_l": str(flux["clip_l"]), "t5xxl": str(flux["t5xxl"]), "vae": str(flux["ae"])}
    alone = read_layout(flux["model"])
    assert any("released sizes" in note for note in alone.notes)
    layout = read_layout(flux["model"], parts)
    assert not layout.notes
    loaded = meta_bundle(layout_of_bundle(load_model(str(flux["model"]), **parts)))
    planned = meta_bundle(layout)
    for name, module in loaded.components().items():
        if hasattr(module, "parameters"):
            assert _parameters(planned.components()[name]) == _parameters(module), name

    sd3 = load_model("tiny:sd3")
    full = load_file(str(sd3.save(tmp_path / "sd3.safetensors")))
    bare = tmp_path / "sd3-mmdit.safetensors"
    save_file({k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}, str(bare))
    for name, module in zip(("clip_l", "clip_g", "t5"), sd3.text_encoders, strict=True):
        module.save_pretrained(tmp_path / name)
    save_file({k[len("first_stage_model.") :]: v for k, v in full.items() if k.startswith("first_stage_model.")},
              str(tmp_path / "vae.safetensors"))  # fmt: skip
    sd3_parts = {"clip_l": str(tmp_path / "clip_l"), "clip_g": str(tmp_path / "clip_g"),
                 "t5xxl": str(tmp_path / "t5"), "vae": str(tmp_path / "vae.safetensors")}  # fmt: skip
    with pytest.raises(LayoutUnavailableError, match="vae, clip_l, clip_g, t5xxl not in the file"):
        read_layout(bare)
    with pytest.raises(LayoutUnavailableError, match=r"^[^:]*: t5xxl not in the file"):
        read_layout(bare, {k: v for k, v in sd3_parts.items() if k != "t5xxl"})
    planned = meta_bundle(read_layout(bare, sd3_parts))
    for name, module in meta_bundle(layout_of_bundle(sd3)).components().items():
        if hasattr(module, "parameters"):
            assert _parameters(planned.components()[name]) == _parameters(module), name


def test_clip_kind_by_the_widths_the_model_expects():
    """A CLIP file is CLIP-L or CLIP-G by the width the model expects of each; with only the two widths' sum (an
    SD3 MMDiT alone: its pooled input, 768 + 1280), CLIP-L is the narrower half; without either, Forge's 768/1280
    (backend/loader.py); a width the model takes for neither is None."""
    from sdcore.models.parts import clip_kind

    assert [clip_kind(w, {}, 2048) for w in (768, 1280, 1024)] == ["clip_l", "clip_g", None]
    assert [clip_kind(w, {}, 96) for w in (32, 64, 48)] == ["clip_l", "clip_g", None]  # the tiny SD3's 32 + 64
    tiny = {"clip_l": 32, "clip_g": 64}
    assert [clip_kind(w, tiny, 96) for w in (32, 64, 768, 16)] == ["clip_l", "clip_g", None, None]
    assert [clip_kind(w, {}, None) for w in (768, 1280, 32)] == ["clip_l", "clip_g", None]


@pytest.fixture(scope="module")
def sd3_files(tmp_path_factory):
    """The tiny SD3 (CLIP-L 32 wide, CLIP-G 64) as files: the MMDiT alone, the MMDiT with CLIP-L only, and
    CLIP-L / CLIP-G / T5 / VAE files in the layout of SAI's separate files, and its diffusers folder."""
    from safetensors.torch import load_file
    from sdcore.models.load import load_model

    root = tmp_path_factory.mktemp("sd3-parts")
    bundle = load_model("tiny:sd3")
    full = load_file(str(bundle.save(root / "full.safetensors")))

    def part(prefix, name):
        return _save({k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}, root / name)

    bundle.save(root / "folder", format="diffusers")
    mmdit = {k: v for k, v in full.items() if k.startswith("model.diffusion_model.")}
    clip_l_prefix = "text_encoders.clip_l.transformer."
    return {
        "folder": root / "folder",
        "bare": _save(mmdit, root / "mmdit.safetensors"),
        "with_l": _save(
            {**mmdit, **{k: v for k, v in full.items() if k.startswith(clip_l_prefix)}},
            root / "mmdit-clip-l.safetensors",
        ),
        "clip_l": part(clip_l_prefix, "clip_l.safetensors"),
        "clip_g": part("text_encoders.clip_g.transformer.", "clip_g.safetensors"),
        "t5xxl": part("text_encoders.t5xxl.transformer.", "t5xxl.safetensors"),
        "vae": part("first_stage_model.", "vae.safetensors"),
    }


def test_sd3_clip_widths_from_the_file(sd3_files, flux):
    """The SD3 MMDiT's pooled input is the two CLIPs' widths together (tiny: 32 + 64); a CLIP the file holds says
    its width, and the other's is the rest; a family without CLIP-G says nothing."""
    from sdcore.models.parts import model_clip_widths

    assert model_clip_widths(sd3_files["bare"]) == ({}, 96)
    assert model_clip_widths(sd3_files["with_l"]) == ({"clip_l": 32, "clip_g": 64}, 96)
    assert model_clip_widths(flux["model"]) == ({}, None)
    assert model_clip_widths("tiny:sd3") == ({}, None)


def test_module_parts_by_header_and_width_whatever_their_order(sd3_files, flux):
    """Forge's modules in any order: each file's part from its tensors; an SD3 CLIP alone is told by its width (the
    tiny CLIP-L alone was CLIP-G under a fixed 768 rule); a part named twice, or one the model does not take, is
    left; an SD model (no part slots) takes its VAE only."""
    from sdcore.models.parts import model_clip_widths, model_part_slots, module_parts

    f = sd3_files
    accepted, lacking = model_part_slots(f["bare"])
    assert set(lacking) == {"clip_l", "clip_g", "t5xxl", "vae"}
    widths = model_clip_widths(f["bare"])
    files = [f["t5xxl"], f["clip_g"], f["vae"], f["clip_l"]]
    assert module_parts(files, accepted, *widths) == (
        {"t5xxl": f["t5xxl"], "clip_g": f["clip_g"], "vae": f["vae"], "clip_l": f["clip_l"]}, [])  # fmt: skip
    assert module_parts([f["clip_l"]], accepted, *widths) == ({"clip_l": f["clip_l"]}, [])
    assert module_parts([f["clip_g"]], accepted, *model_clip_widths(f["with_l"])) == ({"clip_g": f["clip_g"]}, [])
    assert module_parts([f["clip_l"], f["clip_l"]], accepted, *widths) == ({"clip_l": f["clip_l"]}, [f["clip_l"]])
    # FLUX.1 takes CLIP-L alone: the SD3 CLIP-G file is its only CLIP; a FLUX.1 AE is a VAE to an SD model too
    flux_takes, _ = model_part_slots(flux["model"])
    assert module_parts([f["clip_g"], flux["t5xxl"]], flux_takes) == (
        {"clip_l": f["clip_g"], "t5xxl": flux["t5xxl"]},
        [],
    )
    # a folder has its parts (SD3's takes none); a family without part slots (SD1) is None: it takes a --vae only
    assert model_part_slots(f["folder"]) == ((), ()) and model_part_slots("tiny:sd1") is None
    assert module_parts([flux["ae"], flux["clip_l"]], ()) == ({}, [flux["ae"], flux["clip_l"]])
    assert module_parts([flux["ae"], flux["clip_l"]], ("vae",)) == ({"vae": flux["ae"]}, [flux["clip_l"]])
