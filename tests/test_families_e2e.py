"""Issue 19's Done-when path for the flow-matching families, end to end through the CLI on tiny models.

For tiny SD3 and tiny Flux.1 (dev) written as diffusers folders: ``sdcore train lora`` trains and saves
(kohya names by default); diffusers' ``load_lora_weights`` + ``fuse_lora`` on the pipeline read from the
same folder gives the weights sdcore's merged application gives (<= 1e-5); ``sdcore generate`` with
``<lora:name:1>`` applies the file (the image changes) and equals the diffusers pipeline with the fused
LoRA at the same seed; ``sdcore train dreambooth`` (full fine-tune) trains the transformer and saves a
checkpoint that loads back as the same family with the trained (changed) weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

#: family -> (diffusers pipeline class, a kohya module name the file must hold, generate options)
FAMILIES = {
    "flux": ("FluxPipeline", "lora_unet_double_blocks_0_img_attn_qkv", ["--cfg", "3.5"]),
    "sd3": ("StableDiffusion3Pipeline", "lora_unet_joint_blocks_0_x_block_attn_qkv", ["--cfg", "2.0"]),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _folder(family: str, root) -> str:
    from sdcore.models.load import load_model

    return str(load_model(f"tiny:{family}").save(root / f"tiny-{family}", format="diffusers"))


def _train(sd_cli, pm, method: str, model: str, data, out, *extra: str) -> None:
    args = ["train", method, "--model", model, "--data", str(data), "--output", str(out), "--max-steps", "2",
            "--resolution", "64", "--min-bucket-reso", "64", "--no-progress", "--save-dtype", "fp32", "--seed", "0",
            *extra]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)


def _generate(sd_cli, pm, model: str, prompt: str, out, lora_dir, options: list[str]) -> np.ndarray:
    from PIL import Image

    args = ["generate", prompt, "--model", model, "--output", str(out), "--steps", "2", "--size", "64x64",
            "--seed", "7", "--sampler", "euler", "--lora-dir", str(lora_dir), *options]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.int16)


def _components(bundle_or_pipe, family: str) -> dict[str, torch.nn.Module]:
    """Transformer and text encoders, by diffusers component name, of a bundle or a pipeline."""
    names = (
        ["text_encoder", "text_encoder_2"] if family == "flux" else ["text_encoder", "text_encoder_2", "text_encoder_3"]
    )
    if hasattr(bundle_or_pipe, "text_encoders"):
        return {
            "transformer": bundle_or_pipe.transformer,
            **dict(zip(names, bundle_or_pipe.text_encoders, strict=True)),
        }
    return {name: getattr(bundle_or_pipe, name) for name in ("transformer", *names)}


def _fused_in_diffusers(pipeline_name: str, folder: str, lora, family: str):
    """diffusers' pipeline from ``folder`` with ``lora`` loaded by ``load_lora_weights`` and fused at 1.0."""
    import diffusers

    pipe = getattr(diffusers, pipeline_name).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules), lora_scale=1.0)  # text encoders too
    pipe.unload_lora_weights()
    return pipe


def _applied_in_sdcore(folder: str, lora):
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    bundle = load_model(folder)
    apply_lora(bundle, lora, merge=True)
    return bundle


def _max_diff(a: dict[str, torch.nn.Module], b: dict[str, torch.nn.Module]) -> tuple[float, int]:
    """Largest weight difference between the same components, and how many tensors differ at all."""
    worst, differ = 0.0, 0
    for name, module in a.items():
        other = b[name].state_dict()
        for key, value in module.state_dict().items():
            worst = max(worst, float((value - other[key]).abs().max()))
            differ += int(not torch.equal(value, other[key]))
    return worst, differ


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_trains_saves_fuses_in_diffusers_and_generates(family, tmp_path, sd_cli, pm):
    from safetensors.torch import load_file, save_file
    from sdcore.models.load import load_model
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.format import read_lora

    pipeline_name, kohya_module, gen_options = FAMILIES[family]
    folder = _folder(family, tmp_path)
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    loras = tmp_path / "loras"
    kohya, peft = loras / "kohya.safetensors", loras / "peft.safetensors"
    _train(sd_cli, pm, "lora", folder, data, kohya, "--rank", "2", "--lr", "1e-2")  # kohya names: the default
    _train(sd_cli, pm, "lora", folder, data, peft, "--rank", "2", "--lr", "1e-2", "--key-layout", "diffusers")

    lora = read_lora(kohya)
    assert kohya_module in lora.modules, sorted(lora.modules)[:5]
    assert lora.modules[kohya_module].rank == 2  # kohya's default: one LoRA (one down) on the fused qkv
    assert all(name.startswith(("lora_unet_", "lora_te")) for name in lora.modules)
    assert any(float(m.up.abs().max()) > 0 for m in lora.modules.values())  # it trained

    # the same training written in both layouts applies to the same weights in sdcore
    base = _components(load_model(folder), family)
    ours_kohya = _components(_applied_in_sdcore(folder, kohya), family)
    ours_peft = _components(_applied_in_sdcore(folder, peft), family)
    assert _max_diff(ours_kohya, ours_peft)[0] <= 1e-6
    assert _max_diff(ours_peft, base)[1] > 0

    # diffusers' load_lora_weights + fuse_lora give sdcore's merged weights
    pipe = _fused_in_diffusers(pipeline_name, folder, peft, family)
    worst, _ = _max_diff(ours_peft, _components(pipe, family))
    print(f"{family}: diffusers fuse vs sdcore merge, max |dW| = {worst:.2e}")  # shown with pytest -s
    assert worst <= 1e-5, worst
    if family == "flux":  # diffusers reads kohya Flux files too (its linear1 split assumes FLUX.1's 3072 width)
        kept = {k: v for k, v in load_file(str(kohya)).items() if "single_blocks" not in k}
        save_file(kept, str(tmp_path / "kohya_double.safetensors"), {"ss_network_module": "networks.lora_flux"})
        theirs = _fused_in_diffusers(pipeline_name, folder, tmp_path / "kohya_double.safetensors", family)
        mine = _components(_applied_in_sdcore(folder, tmp_path / "kohya_double.safetensors"), family)
        worst, _ = _max_diff(mine, _components(theirs, family))
        assert worst <= 1e-5, worst

    # sdcore generate applies <lora:...> and equals diffusers' pipeline with the fused LoRA at the same seed
    plain = _generate(sd_cli, pm, folder, "x", tmp_path / "plain.png", loras, gen_options)
    with_kohya = _generate(sd_cli, pm, folder, "x <lora:kohya:1>", tmp_path / "kohya.png", loras, gen_options)
    with_peft = _generate(sd_cli, pm, folder, "x <lora:peft:1>", tmp_path / "peft.png", loras, gen_options)
    assert np.abs(plain - with_kohya).max() > 0
    assert np.abs(with_peft - with_kohya).max() <= 1
    settings = {"num_inference_steps": 2, "width": 64, "height": 64, "guidance_scale": float(gen_options[1])}
    image = pipe("x", generator=torch.Generator().manual_seed(7), **settings).images[0]
    reference = np.asarray(image.convert("RGB"), dtype=np.int16)
    print(f"{family}: pixels plain vs <lora> max {np.abs(plain - with_kohya).max()}, vs diffusers max "
          f"{np.abs(reference - with_peft).max()}")  # fmt: skip
    assert np.abs(reference - with_peft).max() <= 1, np.abs(reference - with_peft).max()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dreambooth_full_finetune_trains_and_saves(family, tmp_path, sd_cli, pm):
    from sdcore.models.load import load_model
    from sdcore.testing.datasets import make_tiny_dataset

    folder = _folder(family, tmp_path)
    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    out = tmp_path / f"{family}-db.safetensors"
    _train(sd_cli, pm, "dreambooth", folder, data, out, "--lr", "1e-3")
    base = load_model(folder).transformer.state_dict()
    trained = load_model(str(out))
    assert trained.family == family
    diffs = [float((value - base[key]).abs().max()) for key, value in trained.transformer.state_dict().items()]
    assert len(diffs) == len(base) and max(diffs) > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_memory_options_on_the_family_block_swap_exact_and_fp8_base(family, tmp_path, sd_cli, pm):
    """``--blocks-to-swap`` (with gradient checkpointing) trains the very LoRA the plain run trains, on CPU;
    ``--fp8-base`` trains and saves a LoRA on the float8-stored base (close to, not equal to, the plain one)."""
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_lora.format import read_lora

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    model = f"tiny:{family}"
    runs = {"plain": [], "swap": ["--blocks-to-swap", "1"], "fp8": ["--fp8-base"]}
    files = {}
    for name, extra in runs.items():
        files[name] = tmp_path / f"{name}.safetensors"
        _train(sd_cli, pm, "lora", model, data, files[name], "--rank", "2", "--lr", "1e-2", "--gradient-checkpointing",
               *extra)  # fmt: skip
    plain, swap, fp8 = (read_lora(files[name]).modules for name in runs)
    assert plain.keys() == swap.keys() == fp8.keys()
    for key, module in plain.items():
        assert torch.equal(module.up, swap[key].up) and torch.equal(module.down, swap[key].down), key
    assert max(float(m.up.abs().max()) for m in fp8.values()) > 0
    assert any(not torch.equal(module.up, fp8[key].up) for key, module in plain.items())  # the base was rounded


def test_textual_inversion_on_flux_trains_clip_l_and_t5_on_request(tmp_path, sd_cli, pm):
    """TI on Flux: the CLIP-L vectors (pooled path) and, with ``--train-t5``, a T5 part (OneTrainer's
    ``clip_l``/``t5`` keys); ``--train-t5`` on a family without T5 is one clear line, no traceback."""
    from sdcore.errors import ConfigError
    from sdcore.testing.datasets import make_tiny_dataset
    from sdplugin_ti.formats import load_embedding

    data = make_tiny_dataset(tmp_path / "data", n=1, size=64)

    def run(model: str, out):
        args = ["train", "ti", "--name", "tok", "--init-text", "cat", "--model", model, "--data", str(data),
                "--output", str(out), "--max-steps", "1", "--resolution", "64", "--min-bucket-reso", "64",
                "--no-progress", "--train-t5"]  # fmt: skip
        return sd_cli(args, pm=pm)

    result = run("tiny:flux", tmp_path / "flux")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert set(load_embedding(tmp_path / "flux" / "tok.pt").vectors) == {"clip_l", "t5"}
    result = run("tiny:sd1", tmp_path / "sd1")
    assert result.exit_code != 0
    assert "--train-t5: this sd1 model has no T5 text encoder" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ConfigError)
