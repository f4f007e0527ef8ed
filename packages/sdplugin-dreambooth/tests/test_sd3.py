"""Full fine-tuning of a flow-matching family: tiny SD3 through the whole runtime, saved as an SAI single
file that sdcore and diffusers' ``StableDiffusion3Pipeline.from_single_file`` read to the same weights."""

from __future__ import annotations

import torch
from sdcore.models.family import family_adapter
from sdcore.testing.datasets import make_tiny_dataset
from sdcore.train.loop import train
from sdplugin_dreambooth.method import DreamBoothMethod
from sdplugin_dreambooth.options import DreamBoothOptions


def test_sd3_full_finetune_saves_what_diffusers_reads(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from sdcore.models.load import load_model

    options = DreamBoothOptions(
        model="tiny:sd3",
        data=str(make_tiny_dataset(tmp_path / "data", n=2, repeats=1)),
        output=str(tmp_path / "out" / "sd3.safetensors"),
        resolution=64, min_bucket_reso=64, batch_size=1, lr=1e-3, max_steps=3, seed=0, progress=False,
        save_dtype="fp32",
    )  # fmt: skip
    bundle = family_adapter("sd3").create_tiny()
    before = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    result = train(DreamBoothMethod(options), bundle=bundle)
    trained = bundle.transformer.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in trained)  # the transformer learned something

    ours = load_model(str(result.output))
    assert ours.family == "sd3"
    for key, value in ours.transformer.state_dict().items():
        assert torch.equal(value, trained[key]), key
    config = family_adapter("sd3").create_tiny().save(tmp_path / "config", format="diffusers")
    pipe = StableDiffusion3Pipeline.from_single_file(str(result.output), config=str(config), local_files_only=True)
    for key, value in pipe.transformer.state_dict().items():
        assert torch.equal(value, trained[key]), key
