"""A third-party method plugin end to end: Custom Diffusion (tests/plugin_custom_diffusion) found through an entry
point, trained by `sdcore train` with class images, resumed, and its folder loaded by diffusers' own loaders
(`unet.load_attn_procs` + `pipeline.load_textual_inversion`) with the weights the run trained."""

from pathlib import Path

import pytest

PLUGIN_ROOT = Path(__file__).parent / "plugin_custom_diffusion"


@pytest.fixture
def custom_diffusion_pm(fake_distribution, monkeypatch):
    """The installed-plugin path: a scratch .dist-info whose `sdcore` entry point names the plugin module."""
    from sdcore.plugins import get_plugin_manager

    monkeypatch.syspath_prepend(str(PLUGIN_ROOT))
    fake_distribution("sdtest-customdiffusion", {"cdtest": "sdtest_customdiffusion.plugin"})
    monkeypatch.setenv("SDCORE_LOAD_PLUGINS", "cdtest")
    monkeypatch.setenv("SDCORE_STRICT_PLUGINS", "1")
    return get_plugin_manager()


def _dataset(root: Path, concept: str, *, captions: bool = True) -> Path:
    """Two images in ``1_<concept>``; without caption files their captions are the folder's class tokens."""
    from sdcore.testing.datasets import make_tiny_dataset

    return make_tiny_dataset(root, n=2, size=64, concept=concept, captions=captions)


def test_custom_diffusion_plugin_trains_resumes_and_loads_in_diffusers(
    custom_diffusion_pm, sd_cli, tmp_path, one_torch_thread
):
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
    from safetensors.torch import load_file
    from sdcore.models.tiny import create_tiny_bundle

    listed = sd_cli(["train", "--help"], pm=custom_diffusion_pm)
    assert listed.exit_code == 0 and "custom-diffusion" in listed.output, listed.output
    data, reg = _dataset(tmp_path / "data", "<new1> pattern", captions=False), _dataset(tmp_path / "reg", "pattern")
    out = tmp_path / "cd"
    args = ["train", "custom-diffusion", "--model", "tiny:sd1", "--data", str(data), "--reg-data", str(reg)]
    args += ["--output", str(out), "--initializer-token", "pattern", "--lr", "1e-3", "--no-progress", "--seed", "3"]
    planned = sd_cli([*args, "--max-steps", "4", "--dry-run"], pm=custom_diffusion_pm)
    assert planned.exit_code == 0, planned.output
    assert "2 training images (2 with repeats), 2 class images" in planned.output
    assert "text-encoder outputs no (the text encoder runs every step)" in planned.output  # the token row trains
    first = sd_cli([*args, "--max-steps", "2"], pm=custom_diffusion_pm)
    assert first.exit_code == 0, first.output
    resumed = sd_cli([*args, "--max-steps", "4", "--resume", str(tmp_path / "cd-state")], pm=custom_diffusion_pm)
    assert resumed.exit_code == 0 and "resumed from" in resumed.output, resumed.output
    assert sorted(p.name for p in out.iterdir()) == ["<new1>.bin", "pytorch_custom_diffusion_weights.bin"]
    # what the run trained, as the runtime's own resumable state holds it
    state = load_file(str(next((tmp_path / "cd-state").glob("step-00000004")) / "trainable.safetensors"))

    base = create_tiny_bundle("sd1")  # the weights tiny:sd1 trained from
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoders[0],
        tokenizer=base.tokenizers[0],
        unet=base.unet,
        scheduler=base.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    base_k = {n: m.to_k.weight.detach().clone() for n, m in pipe.unet.named_modules() if n.endswith("attn2")}
    # diffusers 0.42 sets the processors only when given the pipeline (its load_attn_procs applies them under
    # `if _pipeline is not None`); the Custom Diffusion script's own inference path passes through the same call
    pipe.unet.load_attn_procs(str(out), weight_name="pytorch_custom_diffusion_weights.bin", _pipeline=pipe)
    pipe.load_textual_inversion(str(out), weight_name="<new1>.bin")

    loaded = {
        n.removesuffix(".processor"): p for n, p in pipe.unet.attn_processors.items() if n.endswith("attn2.processor")
    }
    assert loaded and set(loaded) == set(base_k)
    for name, proc in loaded.items():
        assert isinstance(proc, CustomDiffusionAttnProcessor)
        trained = state[f"{name}.processor.to_k_custom_diffusion.weight"]
        assert torch.equal(proc.to_k_custom_diffusion.weight, trained)
        assert torch.equal(proc.to_v_custom_diffusion.weight, state[f"{name}.processor.to_v_custom_diffusion.weight"])
        assert not torch.equal(trained, base_k[name])  # it trained
    token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
    row = pipe.text_encoder.get_input_embeddings().weight[token_id]
    init = pipe.text_encoder.get_input_embeddings().weight[
        pipe.tokenizer.encode("pattern", add_special_tokens=False)[0]
    ]
    assert torch.equal(row, state["<new1>"]) and not torch.equal(row, init)
    assert pipe.tokenizer("<new1> pattern").input_ids[1] == token_id  # the prompt word reaches the new row


def test_custom_diffusion_checks_its_token_in_the_captions_before_loading(custom_diffusion_pm, sd_cli, tmp_path):
    """The method's dataset check (TrainingMethod.dataset_problems/dataset_notes) runs in the pre-flight: captions
    without the token are a problem with the others, all at once; some without it, a note."""
    data = _dataset(tmp_path / "data", "<new1> pattern")  # caption files: "sks pattern, red, ..." (no <new1>)
    args = ["train", "custom-diffusion", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "o")]
    refused = sd_cli([*args, "--max-steps", "2", "--lr", "-1", "--dry-run"], pm=custom_diffusion_pm)
    assert refused.exit_code == 2, refused.output
    assert "no caption of the 2 training images contains <new1>: it would never train" in refused.output
    assert "--lr must be positive" in refused.output  # reported together
    (data / "1_<new1> pattern" / "000.txt").write_text("<new1> pattern, red", encoding="utf-8")
    planned = sd_cli([*args, "--max-steps", "2", "--dry-run"], pm=custom_diffusion_pm)
    assert planned.exit_code == 0, planned.output
    assert "1 of 2 training captions lack <new1>" in planned.output
