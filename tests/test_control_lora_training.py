"""Training a FLUX.1 control LoRA (``sdcore train lora --control-lora``), as diffusers'
``examples/flux-control/train_control_lora_flux.py`` trains one, saved in the layout of BFL's Depth/Canny LoRAs.

The file is checked where users load it: diffusers' ``FluxControlPipeline.load_lora_weights`` (which recognises
BFL's layout by a ``query_norm.scale`` key and converts it with ``_convert_bfl_flux_control_lora_to_diffusers``)
and sdcore's own ``<lora:...>`` with ``--control-image``. diffusers' converter hard-codes FLUX.1's 19 + 38 blocks
and 3072 width; the tests run that very function with those three numbers set to the tiny model's (the rest of
its code, and every other step of ``load_lora_weights``, unchanged), so a key it misses or leaves over fails here.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

NAME = "pose-control"


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _pairs(root: Path, n: int, seed: int = 0, side: int = 64) -> tuple[Path, Path]:
    """``n`` pairs whose training image is a fixed function of its control image (a random two-colour control
    image; the training image its colours inverted and mirrored top to bottom), one caption for all."""
    data, controls = root / "data" / "1_pairs", root / "controls"
    data.mkdir(parents=True)
    controls.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        top, bottom = rng.integers(0, 256, (2, 3)).astype(np.uint8)
        control = np.concatenate([np.broadcast_to(c, (side // 2, side, 3)) for c in (top, bottom)]).copy()
        Image.fromarray(control).save(controls / f"p{i}.png")
        Image.fromarray((255 - control)[::-1].copy()).save(data / f"p{i}.png")
        (data / f"p{i}.txt").write_text("a control pair", encoding="utf-8")
    return data.parent, controls


def _options(tmp_path: Path, data: Path, controls: Path, **extra):
    from sdcore.testing.contract import contract_options
    from sdplugin_lora.method import LoraMethod

    values = {"data": str(data), "control_dir": str(controls), "control_lora": True, "rank": 4, "alpha": 4,
              "max_steps": 3, "lr": 1e-2, "batch_size": 2, "save_state": False, "t5xxl_max_token_length": 8,
              "guidance_scale": 30.0, **extra}  # fmt: skip
    return contract_options(LoraMethod, tmp_path, values, family="flux")


#: img_in's weight change as the trained network computed it (alpha 2 over rank 4), for the file to match
TRAINED_DELTA: dict[str, torch.Tensor] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A control LoRA trained 3 steps on tiny FLUX.1 dev (rank 4, alpha 2), norm scales included (uncached
    latents), on every Linear as BFL's releases (``--lora-layers all-linear``: one rank throughout, which the
    resize tests rely on; the script's default set is tests/test_control_lora_options.py's)."""
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    root = tmp_path_factory.mktemp("control")
    data, controls = _pairs(root, 4)
    o = _options(root, data, controls, train_norm_layers=True, alpha=2, lora_layers="all-linear",
                 output=str(root / "loras" / f"{NAME}.safetensors"))  # fmt: skip
    method = LoraMethod(o)
    TrainSession(method, bundle=None).run()
    assert method.network is not None
    img_in = next(m for name, m in method.network.loras.items() if name.endswith("x_embedder"))
    TRAINED_DELTA["img_in"] = img_in.delta_weight()
    return Path(o.output)


def _tiny_bfl_converter(transformer):
    """diffusers' BFL control-LoRA converter with its FLUX.1 sizes (19 double, 38 single blocks, 3072 wide) set to
    ``transformer``'s: the same code object, three constants replaced."""
    from diffusers.loaders import lora_conversion_utils

    original = lora_conversion_utils._convert_bfl_flux_control_lora_to_diffusers
    config = transformer.config
    sizes = {19: config.num_layers, 38: config.num_single_layers,
             3072: config.num_attention_heads * config.attention_head_dim}  # fmt: skip
    code = original.__code__
    assert {c for c in code.co_consts if type(c) is int} >= set(sizes)  # the constants are still there
    consts = tuple(sizes.get(c, c) if type(c) is int else c for c in code.co_consts)
    return types.FunctionType(code.replace(co_consts=consts), original.__globals__, original.__name__)


def _diffusers_pipe(path: Path, monkeypatch):
    """diffusers' FluxControlPipeline on a fresh tiny dev with ``path`` loaded by ``load_lora_weights``."""
    import diffusers
    import diffusers.loaders.lora_pipeline as lora_pipeline
    from sdcore.models.load import load_model

    b = load_model("tiny:flux")
    monkeypatch.setattr(
        lora_pipeline, "_convert_bfl_flux_control_lora_to_diffusers", _tiny_bfl_converter(b.transformer)
    )
    pipe = diffusers.FluxControlPipeline(
        scheduler=type(b.noise_scheduler).from_config(b.noise_scheduler.config), vae=b.vae,
        text_encoder=b.text_encoders[0], tokenizer=b.tokenizers[0], text_encoder_2=b.text_encoders[1],
        tokenizer_2=b.tokenizers[1], transformer=b.transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path))
    assert pipe.transformer.config.in_channels == 128  # diffusers widened x_embedder from lora_A's width
    return pipe


def test_the_file_is_bfls_layout_and_diffusers_fuses_what_sdcore_applies(trained, monkeypatch):
    """The saved file: lora_A/lora_B for every Linear of the transformer under BFL's names (img_in's lora_A 128
    wide), every attention norm scale in full (trained: not the model's), no alpha, and the header and ``lora
    info`` say it is a control LoRA. diffusers' ``load_lora_weights`` + ``fuse_lora`` and sdcore's merge give the
    same transformer (every tensor within 1e-5), and img_in's is dev's weight with zero columns plus B A."""
    from safetensors import safe_open
    from sdcore.models.flux.convert import key_plan
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora
    from sdplugin_lora.format import CONTROL_LORA
    from sdplugin_lora.tools import lora_info

    dev = load_model("tiny:flux")
    config = dev.transformer.config
    with safe_open(str(trained), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    plan = key_plan(config.num_layers, config.num_single_layers, config.guidance_embeds)
    linears = {g.bfl.removesuffix(".weight") for g in plan if g.bfl.endswith(".weight")}
    norms = {g.bfl for g in plan if g.bfl.endswith("norm.scale")}
    assert set(tensors) == {f"{m}.lora_{p}.weight" for m in linears for p in "AB"} | norms
    # every Linear: each double block's two q, k, v triples fused as BFL's qkv (4 fewer), each single block's q, k,
    # v and MLP input as its linear1 (3 fewer)
    count = sum(isinstance(m, torch.nn.Linear) for m in dev.transformer.modules())
    assert len(linears) == count - 4 * config.num_layers - 3 * config.num_single_layers
    assert tensors["img_in.lora_A.weight"].shape == (4, 128)
    delta = tensors["img_in.lora_B.weight"] @ tensors["img_in.lora_A.weight"]  # alpha/rank folded into lora_B
    assert float(delta.abs().max()) > 0 and torch.allclose(delta, TRAINED_DELTA["img_in"], atol=1e-7, rtol=0)
    state = dev.transformer.state_dict()
    assert not torch.equal(tensors["double_blocks.0.img_attn.norm.query_norm.scale"],
                           state["transformer_blocks.0.attn.norm_q.weight"])  # fmt: skip
    assert "sdcore_control_lora" in metadata and "128" in metadata["sdcore_control_lora"]
    assert float(metadata["ss_network_alpha"]) == float(metadata["ss_network_dim"]) == 4  # alpha/rank is in lora_B
    assert lora_info(trained)["control"] == CONTROL_LORA

    pipe = _diffusers_pipe(trained, monkeypatch)
    pipe.fuse_lora()
    theirs = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    applied = apply_lora(dev, trained, 1.0, merge=True, widen=True)
    ours = dev.transformer.state_dict()
    assert set(ours) == set(theirs)
    gaps = {k: float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours}
    assert max(gaps.values()) <= 1e-5, sorted(gaps.items(), key=lambda kv: -kv[1])[:6]
    widened = torch.cat([state["x_embedder.weight"], torch.zeros_like(state["x_embedder.weight"])], dim=1)
    expected = widened + tensors["img_in.lora_B.weight"] @ tensors["img_in.lora_A.weight"]
    assert torch.allclose(ours["x_embedder.weight"], expected, atol=1e-6, rtol=0)
    applied.remove()
    assert dev.transformer.config.in_channels == 64


def _picture(colours, side: int = 32) -> Image.Image:
    top, bottom = (np.array(c, dtype=np.uint8) for c in colours)
    return Image.fromarray(np.concatenate([np.broadcast_to(c, (side // 2, side, 3)) for c in (top, bottom)]))


def test_generation_with_the_lora_and_a_control_image_is_diffusers_control_pipeline(trained, monkeypatch):
    """``<lora:pose-control:1>`` with a control image: sdcore's latents equal diffusers' FluxControlPipeline with the
    file loaded by ``load_lora_weights`` (same seed, control image and guidance), and another control image
    gives another result."""
    from sdcore.generate.session import NetworkSession
    from sdcore.models.flux.generate import build_flux_pipeline, run_flux
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import LoraHandler

    dev = load_model("tiny:flux")
    session = NetworkSession({"lora": LoraHandler(trained.parent)})
    a, b = _picture([(250, 10, 10), (10, 10, 250)]), _picture([(10, 250, 10), (240, 240, 240)])
    settings = {"steps": 2, "cfg": 30.0, "width": 32, "height": 32, "output_type": "latent"}
    with session.apply(dev, f"<lora:{NAME}:1>a control pair") as applied, torch.no_grad():
        pipe = build_flux_pipeline(dev, control=True)
        ours = {name: run_flux(pipe, dev, [applied.prompt], [""], seeds=[5], control=image, **settings)
                for name, image in (("a", a), ("b", b))}  # fmt: skip
    assert dev.transformer.config.in_channels == 64  # restored
    assert float((ours["a"] - ours["b"]).abs().max()) > 1e-4  # the control image matters
    theirs_pipe = _diffusers_pipe(trained, monkeypatch)
    with torch.no_grad():
        packed = theirs_pipe(prompt="a control pair", control_image=a, num_inference_steps=2, guidance_scale=30.0,
                             width=32, height=32, generator=torch.Generator().manual_seed(5),
                             output_type="latent").images  # fmt: skip
    theirs = theirs_pipe._unpack_latents(packed, 32, 32, theirs_pipe.vae_scale_factor)
    assert ours["a"].shape == theirs.shape
    assert torch.allclose(ours["a"].float(), theirs.float(), atol=1e-5, rtol=0)


def test_a_control_lora_learns_to_use_the_control_image(tmp_path):
    """On pairs whose training image is a fixed function of the control image, the fixed-noise loss at high noise
    with each sample's own control latents falls clearly below the loss with another sample's; before training
    both are exactly equal (img_in's new columns are zero and lora_B starts at zero). Cached latents. Every Linear
    adapts (``--lora-layers all-linear``, BFL's releases' set): the check's margin was set on it, and the script's
    smaller default set (no modulation or single-block MLP) learns the tiny pairs more slowly (0.81 of the shuffled
    loss after the same 60 steps).

    The tiny VAE is made sharp (posterior std ~0, latents of about unit spread), as a trained Flux VAE is: the
    random tiny VAE's posterior noise is larger than its mean, so its latents hardly carry the image."""
    from sdcore.models.load import load_model
    from sdcore.testing.conditioning import own_and_shuffled_loss
    from sdcore.train.data import SampleRef
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    n = 8
    data, controls = _pairs(tmp_path, n, side=32)
    bundle = load_model("tiny:flux")
    with torch.no_grad():
        conv = bundle.vae.encoder.conv_out  # channels 16..31 are the posterior's log-variance
        conv.weight[16:].zero_()
        conv.bias[16:].fill_(-30.0)
        conv.weight[:16] *= 16.0
    o = _options(tmp_path, data, controls, max_steps=60, batch_size=n, rank=8, alpha=8, cache_latents=True,
                 lora_layers="all-linear",
                 cache_text_encoder_outputs=True, resolution=32, min_bucket_reso=32, max_bucket_reso=32,
                 bucket_step=32)  # fmt: skip
    session = TrainSession(LoraMethod(o), bundle=bundle)
    session.setup()

    check = session.make_batch([SampleRef(i, 0, -1) for i in range(n)])
    assert check.reference_latents is not None and check.reference_latents.shape == check.latents.shape

    def losses() -> tuple[float, float]:
        return own_and_shuffled_loss(session, n, "reference_latents")

    before_right, before_shuffled = losses()
    session.run()
    right, shuffled = losses()
    print(f"right controls {before_right:.4f} -> {right:.4f}, shuffled {before_shuffled:.4f} -> {shuffled:.4f}")
    assert before_right == before_shuffled  # untrained: the control input is not read at all
    assert right < 0.8 * shuffled, (right, shuffled)  # it learned to read the control image
    assert right < 0.8 * before_right, (before_right, right)


def test_preflight_refuses_what_a_control_lora_cannot_train(tmp_path, monkeypatch):
    """One line per problem, all at once, before any model loads: another family (saying why), schnell, FLUX.1
    Fill and Depth/Canny (from the header), no control images, missing ones (counted and named), a sample prompt
    without a control image (--cn), and options a BFL-layout LoRA cannot hold; a FLUX.1 Kontext model is refused
    once it is known to be one."""
    import sdcore.models.load as load
    from sdcore.errors import ConfigError
    from sdcore.models.layout import ModelLayout
    from sdcore.train.control_lora import control_lora_family_problems
    from sdcore.train.loop import TrainSession
    from sdcore.train.preflight import run_preflight
    from sdplugin_lora.method import LoraMethod

    data, controls = _pairs(tmp_path, 3)
    (controls / "p1.png").unlink()
    real_load = load.load_model

    def no_loading(*args, **kwargs):
        raise AssertionError("the pre-flight loaded the model")

    monkeypatch.setattr(load, "load_model", no_loading)

    def problems(family: str, **extra) -> list[str]:
        o = _options(tmp_path, data, controls, model=f"tiny:{family}", **extra)
        return [p for p in run_preflight(LoraMethod(o), o, plan=False).problems if "control" in p]

    missing = str(data / "1_pairs" / "p1.png")
    assert problems("flux") == [
        f"control images: 1 image(s) without a control image of the same name in their control folder: {missing}"
    ]
    head = "--control-lora trains a FLUX.1 [dev] control LoRA (dev's img_in widened to take a control image); "
    assert problems("sd3")[:1] == [head + "this model is sd3: SD3's MMDiT has no control input on its patch "
                                   "embedding (SD3 ControlNets are separate models)"]  # fmt: skip
    assert problems("flux-schnell")[0] == head + (
        "this model is FLUX.1 schnell, which has no guidance embedding (the control releases and their LoRAs are "
        "distilled from dev)"
    )
    assert problems("sd1")[0].endswith(
        "this model is sd1: its UNet takes no control image on its input (SD ControlNets are separate models)"
    )
    for width, what in ((384, "FLUX.1 Fill"), (128, "FLUX.1 Depth/Canny")):
        layout = ModelLayout("x", "flux", "flow", {"transformer": {"in_channels": width}}, "tiny")
        assert control_lora_family_problems(layout)[0].startswith(head + f"this model is {what}, whose img_in")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    o = _options(tmp_path, data, tmp_path / "nowhere", sample_prompts=str(prompts), sample_every=1)
    o.control_dir = None
    found = run_preflight(LoraMethod(o), o, plan=False).problems
    assert [p for p in found if p.startswith("--control-lora")] == [
        "--control-lora needs a control image beside every training image: give --control-dir (a folder of images "
        "named like the training images), or control_directory for each subset of a dataset TOML",
    ]
    # a sample line without kohya's --cn (tests/test_control_lora_samples.py checks the rest)
    assert [p for p in found if "--cn IMAGE" in p] == [
        "--sample-prompts: a control LoRA's sample renders on a control image, --cn IMAGE (controlnet_image in a "
        "JSON/TOML prompt file); 1 of 1 prompt(s) have none (the first: sample 1, 'a cat'): give them --cn"
    ]
    o = _options(tmp_path, data, controls, split_qkv=True, train_text_encoder=True, algo="lokr")
    found = run_preflight(LoraMethod(o), o, plan=False).problems
    assert any(p.startswith("--control-lora with --algo lokr, --split-qkv, --train-text-encoder/--te-only: ")
               for p in " ; ".join(found).split("; "))  # fmt: skip
    o = _options(tmp_path, data, controls, control_lora=False, train_norm_layers=True)
    assert any("--train-norm-layers trains a control LoRA's norm scales: give --control-lora" in p
               for p in run_preflight(LoraMethod(o), o, plan=False).problems)  # fmt: skip

    monkeypatch.setattr(load, "load_model", real_load)
    kontext = real_load("tiny:flux")
    kontext.metadata["diffusers.pipeline"] = "FluxKontextPipeline"
    (controls / "p1.png").write_bytes((controls / "p0.png").read_bytes())
    session = TrainSession(LoraMethod(_options(tmp_path, data, controls)), bundle=kontext)
    with pytest.raises(ConfigError, match=r"is FLUX\.1 Kontext, which takes its control image as a reference"):
        session.setup()


def test_cli_trains_a_control_lora_that_generate_applies_with_a_control_image(tmp_path, sd_cli, pm):
    """End to end: ``sdcore train lora --control-lora --control-dir`` on a tiny FLUX.1 dev folder, cached latents,
    then ``sdcore generate --control-image`` with ``<lora:...>``: two control images, two different images."""
    from sdcore.models.load import load_model

    folder = str(load_model("tiny:flux").save(tmp_path / "tiny-flux", format="diffusers"))
    data, controls = _pairs(tmp_path, 2)
    out = tmp_path / "loras" / f"{NAME}.safetensors"
    args = ["train", "lora", "--model", folder, "--data", str(data), "--control-dir", str(controls), "--control-lora",
            "--train-norm-layers", "--output", str(out), "--max-steps", "2", "--resolution", "64",
            "--min-bucket-reso", "64", "--no-progress", "--save-dtype", "fp32", "--seed", "0", "--rank", "2",
            "--lr", "1e-2", "--cache-latents", "--t5xxl-max-token-length", "8"]  # fmt: skip
    result = sd_cli(args, pm=pm)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "FLUX.1 control LoRA (control latents joined on the channels): every sample paired" in result.output
    result = sd_cli(["lora", "info", str(out)], pm=pm)
    assert result.exit_code == 0 and "control:     a FLUX.1 Depth/Canny control LoRA" in result.output
    images = []
    for i, colours in enumerate(([(250, 10, 10), (10, 10, 250)], [(10, 250, 10), (240, 240, 240)])):
        control = tmp_path / f"control{i}.png"
        _picture(colours).save(control)
        png = tmp_path / f"out{i}.png"
        result = sd_cli(["generate", f"<lora:{NAME}:1> a control pair", "-m", folder, "--steps", "2", "--seed", "3",
                         "--control-image", str(control), "--lora-dir", str(out.parent), "-o", str(png)], pm=pm)  # fmt: skip
        assert result.exit_code == 0, result.output + repr(result.exception)
        images.append(np.asarray(Image.open(png), dtype=np.int16))
    assert images[0].shape == images[1].shape == (32, 32, 3)
    assert np.abs(images[0] - images[1]).max() > 0


def test_an_interrupted_control_lora_run_resumes_exactly_norm_scales_included(tmp_path):
    """4 steps in one go == 2 steps, Ctrl-C, ``--resume latest``, 2 more: the LoRA and the trained norm scales
    (kept in the training state) are identical."""
    from sdcore.testing.contract import check_resume, contract_options
    from sdcore.testing.datasets import write_inverted_controls
    from sdplugin_lora.method import LoraMethod

    contract_options(LoraMethod, tmp_path, family="flux")  # writes tmp_path/data
    controls = write_inverted_controls(tmp_path / "data", tmp_path / "controls")
    overrides = {"control_lora": True, "train_norm_layers": True, "control_dir": str(controls), "rank": 2,
                 "t5xxl_max_token_length": 8}  # fmt: skip
    check_resume(LoraMethod, tmp_path, overrides, family="flux")
    from sdcore.models.load import load_model

    method = LoraMethod(contract_options(LoraMethod, tmp_path, overrides, family="flux"))
    method.prepare(load_model("tiny:flux"))  # 2 double blocks x 4 norms, 2 single blocks x 2, in the state
    assert sum(key.startswith("sdcore_norm.") for key in method.trainable_state_dict()) == 12


def test_the_bundle_a_control_run_trained_refuses_a_generation_without_a_control_image(tmp_path):
    """After ``train()`` from Python the passed bundle keeps the trained network, as every LoRA run leaves it, so
    here its widened img_in too; generating on it without a control image is the one line naming
    --control-image that a FLUX.1 Depth/Canny model gets (``sdcore.generate.pipeline._flux_control``), not
    diffusers' shape error in the sampler's step (the 128-wide input meets a 64-wide velocity)."""
    from sdcore.errors import ConfigError
    from sdcore.generate.pipeline import generate_images
    from sdcore.models.load import load_model
    from sdcore.train.loop import train
    from sdplugin_lora.method import LoraMethod

    data, controls = _pairs(tmp_path, 2)
    bundle = load_model("tiny:flux")
    train(LoraMethod(_options(tmp_path, data, controls, max_steps=1)), bundle=bundle)
    assert bundle.transformer.config.in_channels == 128  # left as trained, the LoRA attached
    with pytest.raises(ConfigError, match=r"with --control-lora is FLUX\.1 Depth or Canny .*--control-image"):
        generate_images(bundle, ["a cat"], steps=1, cfg=3.5, width=32, height=32)


def test_the_memory_plan_counts_no_extra_tokens_for_the_control_images(tmp_path):
    """A control LoRA's control latents join the noisy ones on the channels (``join_control``: the token count
    stays the image's, as in diffusers' ``train_control_lora_flux.py``), so the pre-flight's activation estimate
    is the one of the same run with no control images, not FLUX.1 Kontext's with a reference image's tokens
    added (:func:`sdcore.train.memory.transformer_activation_bytes`' ``reference_images``)."""
    from sdcore.train.preflight import memory_plan, run_preflight
    from sdplugin_lora.method import LoraMethod

    data, controls = _pairs(tmp_path, 2)
    o = _options(tmp_path, data, controls)
    report = run_preflight(LoraMethod(o), o)
    assert report.memory is not None and report.layout is not None
    kontext = memory_plan(LoraMethod(o), o, layout=report.layout, params=report.memory.params, reference_images=1)
    plain = memory_plan(LoraMethod(o), o, layout=report.layout, params=report.memory.params)
    assert kontext.estimate.activations > plain.estimate.activations  # the extra tokens a reference would add
    assert report.memory.estimate.activations == plain.estimate.activations


def test_a_run_in_kohyas_or_diffusers_names_trains_no_text_encoder_by_default(tmp_path, monkeypatch):
    """A control-LoRA run written with the names diffusers' train_control_lora_flux.py shares with kohya
    (``--pretrained_model_name_or_path``, ``--learning_rate``, ``--max_train_steps``) gets kohya's defaults, but not
    "the text encoder is trained unless --network_train_unet_only" (flux_train_network.py trains CLIP-L by default):
    kohya has no control-LoRA script, and a control LoRA trains no text encoder, so that default only made the
    pre-flight refuse a --train-text-encoder nobody gave. A run that does give it is still refused."""
    import sdcore.models.load as load
    from sdcore.train.config import load_options
    from sdcore.train.preflight import run_preflight
    from sdplugin_lora.method import LoraMethod, LoraOptions

    def no_loading(*args, **kwargs):
        raise AssertionError("the pre-flight loaded the model")

    monkeypatch.setattr(load, "load_model", no_loading)
    data, controls = _pairs(tmp_path, 2)

    def run(extra: str = ""):
        path = tmp_path / "kohya.toml"
        path.write_text(f'pretrained_model_name_or_path = "tiny:flux"\ntrain_data_dir = "{data}"\n'
                        f'control_dir = "{controls}"\ncontrol_lora = true\nguidance_scale = 30.0\nrank = 4\n'
                        f"learning_rate = 1e-4\nmax_train_steps = 2\n{extra}", encoding="utf-8")  # fmt: skip
        notes: list[str] = []
        o = load_options(LoraOptions, path, notes=notes)
        o.output = str(tmp_path / "out" / f"{NAME}.safetensors")
        found = [p for p in run_preflight(LoraMethod(o), o, plan=False).problems if "--control-lora" in p]
        return o, " | ".join(notes), found

    o, notes, found = run()
    assert "network_alpha defaults to 1" in notes  # kohya's defaults do apply
    assert o.train_text_encoder is False and "the text encoder is trained" not in notes
    assert found == []
    o, _, found = run("train_text_encoder = true\n")
    assert o.train_text_encoder is True and len(found) == 1 and "--train-text-encoder/--te-only" in found[0]
