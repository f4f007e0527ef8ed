"""Chroma (lodestones' FLUX.1-schnell derivative, T5 only): the tiny model, its file layouts, its
conditioning and its transformer call.

References written here, not taken from sdcore: lodestones' checkpoint keys as diffusers'
``convert_chroma_transformer_checkpoint_to_diffusers`` documents them (inverted below), diffusers'
``ChromaPipeline`` for the prompt encoding, and kohya's Chroma forward for the attention mask (it keeps
the prompt's tokens plus one padding token, ``attn_padding=1``, by cutting the text there).
"""

from __future__ import annotations

import hashlib
import json

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def chroma():
    from sdcore.models.family import family_adapter

    return family_adapter("chroma").create_tiny()


def _original_keys(state: dict) -> dict:
    """A diffusers ``ChromaTransformer2DModel`` state dict in lodestones' keys: the inverse of diffusers'
    converter (q, k, v stacked into ``qkv``; single blocks' q, k, v and MLP input into ``linear1``;
    the approximator's ``linear_1/2`` are ``in_layer/out_layer`` and its RMSNorm weights ``scale``)."""
    out = {}
    for name, bfl in (("context_embedder", "txt_in"), ("x_embedder", "img_in"), ("proj_out", "final_layer.linear"),
                      ("distilled_guidance_layer.in_proj", "distilled_guidance_layer.in_proj"),
                      ("distilled_guidance_layer.out_proj", "distilled_guidance_layer.out_proj")):  # fmt: skip
        for kind in ("weight", "bias"):
            out[f"{bfl}.{kind}"] = state[f"{name}.{kind}"]
    layers = {int(k.split(".")[2]) for k in state if k.startswith("distilled_guidance_layer.layers.")}
    for i in layers:
        a = f"distilled_guidance_layer.layers.{i}"
        for kind in ("weight", "bias"):
            out[f"{a}.in_layer.{kind}"] = state[f"{a}.linear_1.{kind}"]
            out[f"{a}.out_layer.{kind}"] = state[f"{a}.linear_2.{kind}"]
        out[f"distilled_guidance_layer.norms.{i}.scale"] = state[f"distilled_guidance_layer.norms.{i}.weight"]
    doubles = {int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")}
    for i in doubles:
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{kind}"] = torch.cat([state[f"{d}.attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{kind}"] = torch.cat([state[f"{d}.attn.add_{x}_proj.{kind}"] for x in "qkv"])
            for name, bfl in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                              ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                              ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):  # fmt: skip
                out[f"{b}.{bfl}.{kind}"] = state[f"{d}.{name}.{kind}"]
        for name, bfl in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                          ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):  # fmt: skip
            out[f"{b}.{bfl}.scale"] = state[f"{d}.attn.{name}.weight"]
    singles = {int(k.split(".")[1]) for k in state if k.startswith("single_transformer_blocks.")}
    for i in singles:
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for kind in ("weight", "bias"):
            parts = [state[f"{d}.attn.to_{x}.{kind}"] for x in "qkv"] + [state[f"{d}.proj_mlp.{kind}"]]
            out[f"{b}.linear1.{kind}"] = torch.cat(parts)
            out[f"{b}.linear2.{kind}"] = state[f"{d}.proj_out.{kind}"]
        out[f"{b}.norm.query_norm.scale"] = state[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = state[f"{d}.attn.norm_k.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in state.values())  # every tensor placed
    return {k: v.contiguous().clone() for k, v in out.items()}


def _same(left, right):
    a, b = left.state_dict(), right.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_cli_create_tiny_info_and_hashes(tmp_path):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    for target in ("tiny", "tiny.safetensors"):
        result = CliRunner().invoke(cli, ["model", "create-tiny", "--family", "chroma", str(tmp_path / target)])
        assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "tiny" / "model_index.json").read_text())
    assert index["_class_name"] == "ChromaPipeline" and index["text_encoder"][1] == "T5EncoderModel"
    assert "text_encoder_2" not in index
    result = CliRunner().invoke(cli, ["model", "info", str(tmp_path / "tiny.safetensors")])
    assert result.exit_code == 0, result.output
    assert "chroma (Chroma)" in result.output and "ChromaTransformer2DModel" in result.output
    assert "CLIPTextModel" not in result.output
    digest = hashlib.sha256((tmp_path / "tiny.safetensors").read_bytes()).hexdigest()
    assert f"sha256:                     {digest}" in result.output and "AutoV3" in result.output


def test_original_layout_file_loads_exactly_and_is_told_from_flux(chroma, tmp_path):
    from safetensors.torch import save_file
    from sdcore.models.detect import detect_family
    from sdcore.models.family import family_adapter
    from sdcore.models.load import load_model

    original = _original_keys(chroma.transformer.state_dict())
    assert "distilled_guidance_layer.norms.0.scale" in original and "double_blocks.0.img_mod.lin.weight" not in original
    path = tmp_path / "Chroma1-HD.safetensors"
    save_file(original, str(path))
    assert detect_family(set(original)) == "chroma"
    comfy = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    assert detect_family(set(comfy)) == "chroma"
    assert not family_adapter("flux").detect_single_file(set(original))
    # FLUX.1 schnell (Chroma's base) in the same BFL layout stays Flux
    flux = family_adapter("flux").create_tiny(variant="schnell")
    assert detect_family(set(flux.transformer.state_dict())) == "flux"
    from sdcore.models.flux.convert import diffusers_to_bfl

    assert detect_family(set(diffusers_to_bfl(flux.transformer.state_dict()))) == "flux"
    # a transformer alone in diffusers keys (transformer/diffusion_pytorch_model.safetensors) is Chroma too
    assert detect_family(set(chroma.transformer.state_dict())) == "chroma"

    loaded = load_model(path, t5xxl=None)
    assert loaded.family == "chroma" and type(loaded.transformer).__name__ == "ChromaTransformer2DModel"
    _same(loaded.transformer, chroma.transformer)
    assert loaded.text_encoders == [] and loaded.vae is None


def test_writers_and_diffusers_folders_read_back(chroma, tmp_path):
    import diffusers
    from sdcore.models.load import load_model

    pipe = diffusers.ChromaPipeline(scheduler=chroma.noise_scheduler, vae=chroma.vae, text_encoder=chroma.text_encoders[0],
                                    tokenizer=chroma.tokenizers[0], transformer=chroma.transformer)  # fmt: skip
    pipe.save_pretrained(tmp_path / "by-diffusers")
    for path in (tmp_path / "by-diffusers", chroma.save(tmp_path / "ours", format="diffusers"),
                 chroma.save(tmp_path / "comfy.safetensors")):  # fmt: skip
        loaded = load_model(path)
        assert loaded.family == "chroma", path
        for name in ("transformer", "vae"):
            _same(getattr(loaded, name), getattr(chroma, name))
        _same(loaded.text_encoders[0], chroma.text_encoders[0])
    bfl = chroma.save(tmp_path / "alone.safetensors", format="bfl")
    loaded = load_model(bfl, t5xxl=tmp_path / "ours" / "text_encoder", ae=tmp_path / "ours" / "vae")
    _same(loaded.transformer, chroma.transformer)
    _same(loaded.text_encoders[0], chroma.text_encoders[0])
    from sdcore.errors import SdcoreError

    with pytest.raises(SdcoreError, match="clip_l do not apply to Chroma"):
        load_model(bfl, clip_l=tmp_path / "ours" / "text_encoder")


def test_encode_prompts_equals_the_pipeline(chroma):
    import diffusers
    from sdcore.models.family import family_adapter
    from sdcore.models.flux.adapter import T5_MASK

    pipe = diffusers.ChromaPipeline(scheduler=None, vae=None, text_encoder=chroma.text_encoders[0],
                                    tokenizer=chroma.tokenizers[0], transformer=None)  # fmt: skip
    prompts = ["a red ring", "a much longer prompt about a small blue cube on a table"]
    embeds, mask = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=24, device=torch.device("cpu"))
    cond = family_adapter("chroma").encode_prompts(chroma, prompts, t5_max_length=24, t5_attention_mask=False)
    torch.testing.assert_close(cond.hidden_states, embeds, atol=0, rtol=0)
    assert cond.pooled is None
    assert torch.equal(cond.extra[T5_MASK], mask.bool())
    # kohya's rule: prompt tokens (EOS included) plus one padding token, at most the padded length
    tokens = chroma.tokenizers[0](prompts, padding="max_length", max_length=24, truncation=True,
                                 return_tensors="pt").attention_mask  # fmt: skip
    assert cond.extra[T5_MASK].sum(1).tolist() == [min(int(n) + 1, 24) for n in tokens.sum(1)]  # kohya clips to L


def test_predict_hides_padding_as_kohya_cuts_the_text(chroma):
    """kohya's Chroma forward keeps ``mask.sum() + 1`` text tokens and drops the rest; predict with the padded
    text and its mask must give the same velocity as the transformer on the cut text without a mask."""
    from sdcore.models.family import family_adapter
    from sdcore.models.flux.adapter import T5_MASK, image_ids, pack_latents, text_ids, unpack_latents

    adapter = family_adapter("chroma")
    prompts = ["a ring", "a small blue cube on a wooden table"]
    cond = adapter.encode_prompts(chroma, prompts, t5_max_length=32)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 4, 4, generator=gen)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        got = adapter.predict(chroma, latents, t, cond)
        kept = cond.extra[T5_MASK].sum(1).tolist()
        assert kept[0] < kept[1] < 32
        for i, n in enumerate(kept):
            text = cond.hidden_states[i : i + 1, :n]
            out = chroma.transformer(hidden_states=pack_latents(latents[i : i + 1]), timestep=t[i : i + 1] / 1000,
                                     encoder_hidden_states=text, txt_ids=text_ids(n), img_ids=image_ids(4, 4),
                                     return_dict=False)[0]  # fmt: skip
            torch.testing.assert_close(got[i : i + 1], unpack_latents(out, 4, 4), atol=1e-5, rtol=0)
        unmasked = adapter.predict(chroma, latents, t, type(cond)(cond.hidden_states, None, {}))
    assert (unmasked - got).abs().max() > 1e-4  # the mask matters


def test_memory_plan_counts_the_released_chroma(tmp_path):
    """The released transformer (kohya's chroma_params) counted by hand: 8.9B parameters; a transformer-only
    file's layout (the pre-flight's, from its header) plans T5 and the VAE at their released sizes."""
    from sdcore.models.chroma.tiny import transformer_config
    from sdcore.models.layout import meta_bundle

    h, mlp, ctx, a_in, a_h, a_n, head = 3072, 4 * 3072, 4096, 64, 5120, 5, 128

    def lin(i, o):
        return i * o + o

    double = 2 * (lin(h, 3 * h) + 2 * head + lin(h, h) + lin(h, mlp) + lin(mlp, h))
    single = lin(h, 3 * h + mlp) + lin(h + mlp, h) + 2 * head
    approximator = lin(a_in, a_h) + a_n * (2 * lin(a_h, a_h) + a_h) + lin(a_h, h)
    want = lin(64, h) + lin(ctx, h) + approximator + 19 * double + 38 * single + lin(h, 64)
    assert 8.8e9 < want < 9.0e9

    from sdcore.models.family import family_adapter

    config = transformer_config(tiny=False)
    with torch.device("meta"):
        import diffusers

        model = diffusers.ChromaTransformer2DModel(**config)
    assert sum(p.numel() for p in model.parameters()) == want
    tiny = family_adapter("chroma").create_tiny()
    path = tiny.save(tmp_path / "alone.safetensors", format="bfl")
    layout = family_adapter("chroma").read_layout(path)
    assert layout.family == "chroma" and "vae, t5xxl" in " ".join(layout.notes)
    bundle = meta_bundle(layout)
    assert sum(p.numel() for p in bundle.transformer.parameters()) == sum(
        p.numel() for p in tiny.transformer.parameters()
    )
    assert sum(p.numel() for p in bundle.text_encoders[0].parameters()) > 4e9  # T5-XXL planned at its real size


def test_gradient_checkpointing_keeps_the_mask_in_every_block():
    """diffusers 0.42 calls Chroma's single blocks under checkpointing without the attention mask; the runtime's
    checkpointing must compute what the plain call computes (padded prompts: the mask matters), gradients too."""
    from sdcore.models.family import family_adapter
    from sdcore.train.method import Capabilities
    from sdcore.train.placement import enable_gradient_checkpointing

    adapter = family_adapter("chroma")
    bundle = adapter.create_tiny()
    with torch.no_grad():
        cond = adapter.encode_prompts(bundle, ["a ring", "a small blue cube on a wooden table"], t5_max_length=32)
    latents = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 800.0])

    def output_and_gradients():
        bundle.denoiser.zero_grad(set_to_none=True)
        out = adapter.predict(bundle, latents, t, cond)
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in bundle.denoiser.named_parameters() if p.grad is not None}
        return out.detach(), grads

    plain, plain_grads = output_and_gradients()
    enable_gradient_checkpointing(bundle, Capabilities())
    assert bundle.denoiser.gradient_checkpointing
    checkpointed, grads = output_and_gradients()
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=0)
    assert grads.keys() == plain_grads.keys() and any(n.startswith("single_transformer_blocks") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_file_without_img_in_is_one_line_naming_the_file(chroma, tmp_path):
    """A cut-down file without ``img_in`` (the tensor the transformer's width is read from): loading and the
    pre-flight's layout raised a bare KeyError traceback."""
    from safetensors.torch import load_file, save_file
    from sdcore.errors import ModelFormatError
    from sdcore.models.family import family_adapter
    from sdcore.models.load import load_model

    full = chroma.save(tmp_path / "full.safetensors")
    state = {k: v for k, v in load_file(str(full)).items() if k != "model.diffusion_model.img_in.weight"}
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path))
    for read in (load_model, family_adapter("chroma").read_layout):
        with pytest.raises(ModelFormatError) as info:
            read(path)
        message = str(info.value)
        assert "\n" not in message and str(path) in message and "img_in.weight" in message


@pytest.mark.parametrize(("sampler", "name"), [("dpm++2m", "DPMSolverMultistepScheduler"),
                                               ("unipc", "UniPCMultistepScheduler")])  # fmt: skip
def test_solvers_run_on_their_own_flow_sigmas_as_on_flux(chroma, sampler, name):
    """``ChromaPipeline`` always hands the scheduler its Euler sigma list, which diffusers' DPM-Solver refused
    with a raw ValueError ("does not support custom sigmas") and UniPC shifted instead of its own; the
    solvers now lay out their own flow sigmas as ``FluxPipeline`` has them (it drops the list for a scheduler
    with ``use_flow_sigmas``): the transformer sees the timesteps of diffusers' solver in flow mode with
    Chroma's dynamic shift at the image's ``mu`` (``calculate_shift`` of its token count); its
    timesteps are whole numbers, the list's are not."""
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    from sdcore.generate.pipeline import generate_images

    seen = []
    hook = chroma.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(float(kw["timestep"][0])), with_kwargs=True
    )
    try:
        image = generate_images(chroma, ["a ring"], steps=4, cfg=1.0, seed=3, width=32, height=48, sampler=sampler)[0]
    finally:
        hook.remove()
    assert image.size == (32, 48)
    config = chroma.noise_scheduler.config
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "DPMSolverMultistepScheduler" else {}
    solver = getattr(diffusers, name)(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                                      use_dynamic_shifting=True, time_shift_type="exponential", **extra)  # fmt: skip
    tokens = (32 // 16) * (48 // 16)  # the packed latent's tokens: (side / 8 / 2) each way
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)  # fmt: skip
    solver.set_timesteps(4, mu=mu)
    expected = (solver.timesteps.float() / 1000).tolist()  # the pipeline hands the transformer t / 1000
    assert seen == pytest.approx(expected, abs=1e-6)
