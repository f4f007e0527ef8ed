"""A Chroma LoRA trained from kohya's flags (flux_train_network.py --model_type chroma) on the tiny Chroma:
kohya's lora_flux names for Chroma's blocks (no modulation Linears), kohya's Chroma metadata, fused by
diffusers' ChromaPipeline exactly, applied by sdcore, and used by ``sdcore generate``.

The expected names and weights are written here from kohya's rules: every Linear of BFL's
DoubleStreamBlock (img/txt ``attn.qkv``, ``attn.proj``, ``mlp.0``, ``mlp.2``) and SingleStreamBlock
(``linear1``, ``linear2``), and a module's change ``alpha / rank * up @ down``, its rows stacked as
q, k, v (and the MLP input in ``linear1``).
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from sdcore.testing.contract import make_tiny_dataset  # noqa: E402

#: kohya module (without lora_unet_ and the block) -> the diffusers modules whose rows it stacks
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
}
SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": ("proj_out",)}


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("chroma")
    make_tiny_dataset(root / "data", n=2, size=64)
    CliRunner().invoke(_cli(), ["model", "create-tiny", "--family", "chroma", str(root / "model")])
    out = root / "models" / "Lora" / "ring.safetensors"
    args = ["train", "lora", "--pretrained_model_name_or_path", str(root / "model"), "--model_type", "chroma",
            "--train_data_dir", str(root / "data"), "--output", str(out), "--network_dim", "2", "--network_alpha", "1",
            "--resolution", "64", "--max_train_steps", "2", "--learning_rate", "0.05", "--save_precision", "float",
            "--apply_t5_attn_mask", "--guidance_scale", "0.0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root, out, result.output


def _deltas(path) -> dict[str, torch.Tensor]:
    """diffusers module path -> its weight change, from the file's kohya modules."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    out = {}
    for table, block, count in ((DOUBLE, "double_blocks", 2), (SINGLE, "single_blocks", 2)):
        prefix = "transformer_blocks" if block == "double_blocks" else "single_transformer_blocks"
        for i in range(count):
            for name, parts in table.items():
                key = f"lora_unet_{block}_{i}_{name}"
                up, down = state[f"{key}.lora_up.weight"], state[f"{key}.lora_down.weight"]
                delta = float(state[f"{key}.alpha"]) / down.shape[0] * up @ down
                rows = [delta.shape[0] // 3] * 3 if len(parts) == 3 else None
                if len(parts) == 4:  # q, k, v of the width, then the MLP input (4 x width)
                    width = (delta.shape[0]) // 7
                    rows = [width, width, width, 4 * width]
                for part, value in zip(parts, delta.split(rows) if rows else [delta], strict=True):
                    out[f"{prefix}.{i}.{part}"] = value
    return out


def test_kohya_chroma_run_names_and_metadata(trained):
    from sdplugin_lora.format import read_lora

    _, path, output = trained
    lora = read_lora(path)
    want = {f"lora_unet_double_blocks_{i}_{n}" for i in range(2) for n in DOUBLE}
    want |= {f"lora_unet_single_blocks_{i}_{n}" for i in range(2) for n in SINGLE}
    assert set(lora.modules) == want  # no img_mod/txt_mod/modulation (Chroma has none), no T5 without train_t5xxl
    meta = lora.metadata
    expected = {"ss_base_model_version": "chroma", "ss_model_type": "chroma", "modelspec.architecture": "chroma/lora",
                "modelspec.implementation": "https://huggingface.co/lodestones/Chroma",
                "ss_network_module": "networks.lora_flux", "ss_apply_t5_attn_mask": "True",
                "ss_guidance_scale": "0.0", "ss_timestep_sampling": "sigma",
                "ss_model_prediction_type": "sigma_scaled"}  # fmt: skip
    assert {k: meta.get(k) for k in expected} == expected
    assert "modelspec.prediction_type" not in meta
    assert "chroma: timestep_sampling defaults to sigma" in output


def test_diffusers_chroma_pipeline_fuses_it_and_sdcore_applies_it(trained):
    import diffusers
    from safetensors.torch import load_file
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_loras
    from sdplugin_lora.format import parse_state_dict

    root, path, _ = trained
    deltas = _deltas(path)
    assert all(float(d.abs().max()) > 0 for d in deltas.values())  # two steps moved every module
    # diffusers' kohya Flux reader splits linear1 at the real width (3 x 3072 + 12288): the tiny single blocks are
    # checked through sdcore below (and Flux's full-width test covers that split)
    pipe = diffusers.ChromaPipeline.from_pretrained(root / "model")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights({k: v for k, v in load_file(str(path)).items() if "single_blocks" not in k})
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    after = pipe.transformer.state_dict()
    double = {p: d for p, d in deltas.items() if p.startswith("transformer_blocks.")}
    for key, value in before.items():
        module = key.rsplit(".", 1)[0]
        want = value + 0.7 * double[module] if key.endswith(".weight") and module in double else value
        torch.testing.assert_close(after[key], want, atol=1e-5, rtol=0, msg=key)

    bundle = load_model(root / "model")
    base = {k: v.clone() for k, v in bundle.transformer.state_dict().items()}
    applied = apply_loras(bundle, [parse_state_dict(load_file(str(path)))], merge=True, strict=True)
    merged = bundle.transformer.state_dict()
    for module, delta in deltas.items():
        torch.testing.assert_close(merged[f"{module}.weight"], base[f"{module}.weight"] + delta, atol=1e-5, rtol=0)
    applied.remove()


def test_generate_with_and_without_the_lora(trained):
    from PIL import Image

    root, _, _ = trained

    def render(prompt: str, name: str):
        out = root / name
        args = ["generate", "--model", str(root / "model"), prompt, "--steps", "2", "--seed", "5", "--size", "64x64",
                "--cfg", "3", "-o", str(out), "--models-dir", str(root / "models")]  # fmt: skip
        result = CliRunner().invoke(_cli(), args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        import numpy as np

        return torch.from_numpy(np.asarray(Image.open(out).convert("RGB"), dtype=np.float32))

    plain, again = render("a ring", "a.png"), render("a ring", "b.png")
    assert torch.equal(plain, again)  # deterministic with a seed
    with_lora = render("a ring <lora:ring:1>", "c.png")
    assert (with_lora - plain).abs().max() > 0


def test_full_finetune_saves_a_chroma_that_loads_back(trained):
    from sdcore.models.load import load_model

    root, _, _ = trained
    out = root / "db.safetensors"
    args = ["train", "dreambooth", "--model", str(root / "model"), "--data", str(root / "data"), "--output", str(out),
            "--resolution", "64", "--max-steps", "2", "--lr", "1e-3", "--save-dtype", "fp32", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    tuned, base = load_model(out), load_model(root / "model")
    assert tuned.family == "chroma"
    changed = [
        k for k, v in tuned.transformer.state_dict().items() if not torch.equal(v, base.transformer.state_dict()[k])
    ]
    assert changed  # the transformer trained
    for k, v in tuned.vae.state_dict().items():
        assert torch.equal(v, base.vae.state_dict()[k]), k  # the VAE did not


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"train_text_encoder": True}, "--train-text-encoder on chroma"),
        ({"te_only": True}, "--te-only on chroma"),
        ({"train_text_encoder": True, "train_t5": True}, None),
        ({}, None),
    ],
)
def test_text_encoder_training_on_chroma_needs_train_t5(tmp_path, options, problem):
    """Chroma's only text encoder is T5-XXL, which the text-encoder LoRA covers with --train-t5 alone: without it
    the network would hold no text-encoder module (checked: prepare builds none), so the pre-flight refuses it;
    FLUX.1, which has CLIP-L, is not refused."""
    from sdcore.testing.contract import _bundle, contract_options
    from sdplugin_lora.method import LoraMethod

    method = LoraMethod(contract_options(LoraMethod, tmp_path, {"rank": 4, **options}, family="chroma"))
    problems = [p for p in method.family_problems("chroma") if "text encoder is T5-XXL" in p]
    if problem is None:
        assert problems == []
    else:
        assert problems == [
            f"{problem}: its only text encoder is T5-XXL, which a LoRA trains with --train-t5 (kohya train_t5xxl); "
            "without it no text-encoder module would train"
        ]
        assert method.family_problems("flux") == []
        method.prepare(_bundle("chroma"))
        assert not [k for k in method.network.state_dict() if k.startswith("lora_te")]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_train_t5_on_a_family_without_t5_is_refused(tmp_path, family):
    # sweep2: `train lora --model tiny:sd1 --train-t5` trained as without it, in silence
    from sdcore.testing.contract import contract_options
    from sdplugin_lora.method import LoraMethod

    method = LoraMethod(contract_options(LoraMethod, tmp_path, {"rank": 4, "train_t5": True}, family=family))
    assert f"--train-t5 trains the T5-XXL encoder of SD3/FLUX.1/Chroma; {family} has none: drop it" in (
        method.family_problems(family)
    )
    assert not [p for p in method.family_problems("flux") if "--train-t5" in p]
