"""diffusers' ``train_control_lora_flux.py`` options a control-LoRA user brings: ``--use_lora_bias`` (sdcore
``--lora-bias``), ``--lora_layers`` (``--lora-layers``) and ``--jsonl_for_train`` with its column options (``--data
x.jsonl``, ``--image-column``, ``--conditioning-image-column``, ``--caption-column``).

The rule each is checked against is rewritten here from the script: PEFT's ``lora_bias=True`` builds ``lora_B``
with a bias that ``reset_lora_parameters`` zeroes and the forward scales with the rest (``lora_B(lora_A(x)) *
scaling``); ``--lora_layers`` are PEFT ``target_modules`` (a module matches a name when its path is the name or ends
in ``.<name>``), ``x_embedder`` added unless ``all-linear``, which collects every ``nn.Linear`` of the transformer;
the JSONL is rows of an image path, a control image path and a caption.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


def _training_helpers():
    """test_control_lora_training.py's pairs, options and diffusers pipe (pytest imports tests in importlib mode,
    so a sibling module is loaded by its path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_control_training", Path(__file__).with_name(
        "test_control_lora_training.py"))  # fmt: skip
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._diffusers_pipe, module._options, module._pairs


_diffusers_pipe, _options, _pairs = _training_helpers()

NAME = "bias-control"

#: diffusers' default target_modules in train_control_lora_flux.py (no --lora_layers), as the script lists them
SCRIPT_DEFAULT = ["x_embedder", "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                  "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                  "ff_context.net.0.proj", "ff_context.net.2"]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def _script_targets(transformer, lora_layers: str | None) -> set[str]:
    """The module names PEFT adapts for the script's ``target_modules`` (its L841-870, rewritten)."""
    linears = {name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    if lora_layers == "all-linear":
        return linears
    names = SCRIPT_DEFAULT if lora_layers is None else [n.strip() for n in lora_layers.split(",")]
    if "x_embedder" not in names:
        names = [*names, "x_embedder"]
    return {key for key in linears if key in names or any(key.endswith(f".{n}") for n in names)}


def _adapted(method) -> set[str]:
    """The diffusers module paths the method's network adapts (a shared-down module: each of its members)."""
    out: set[str] = set()
    for name, module in method.network.loras.items():
        paths = getattr(module, "paths", None)
        out |= set(paths) if paths else {method.index.targets[name].path}
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A control LoRA trained 3 steps with --lora-bias (rank 4, alpha 2: scale 1/2), the script's default
    targets; the trained network's biases by module name."""
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    root = tmp_path_factory.mktemp("bias")
    data, controls = _pairs(root, 4)
    o = _options(root, data, controls, lora_bias=True, alpha=2, output=str(root / "loras" / f"{NAME}.safetensors"))
    method = LoraMethod(o)
    TrainSession(method, bundle=None).run()
    biases = {name: m.up_bias.detach().clone() for name, m in method.network.loras.items()}
    return Path(o.output), biases, _adapted(method)


def test_lora_bias_trains_from_zero_and_the_bfl_file_holds_it(trained):
    """Every module has a lora_up bias, moved away from PEFT's zero init by training; the BFL file holds it as
    ``lora_B.bias`` with alpha/rank folded in, as lora_B's weight (BFL's files apply at scale 1)."""
    from safetensors.torch import load_file

    path, biases, _ = trained
    assert biases and all(b is not None for b in biases.values())
    assert all(float(b.abs().max()) > 0 for b in biases.values())  # zero init, trained
    tensors = load_file(str(path))
    img_in = next(b for name, b in biases.items() if name.endswith("x_embedder"))
    assert torch.allclose(tensors["img_in.lora_B.bias"], img_in * 0.5, atol=1e-7, rtol=0)
    qkv = next(b for name, b in biases.items() if name.endswith("double_blocks_0_img_attn_qkv"))
    assert torch.allclose(tensors["double_blocks.0.img_attn.qkv.lora_B.bias"], qkv * 0.5, atol=1e-7, rtol=0)
    # a Linear the script's default leaves out (the modulation) is a zero rank-1 module, zero bias included (PEFT
    # builds every module with a bias once the file has one: diffusers' load fails on a missing one)
    for suffix in ("lora_A.weight", "lora_B.weight", "lora_B.bias"):
        assert float(tensors[f"double_blocks.0.img_mod.lin.{suffix}"].abs().max()) == 0
    assert tensors["double_blocks.0.img_mod.lin.lora_A.weight"].shape[0] == 1


def test_lora_info_shows_the_zero_placeholder_modules_apart(trained, sd_cli, pm):
    """``sdcore lora info`` on a control LoRA with the script's default targets: the modules it left out (rank 1 in
    the file, all zero) are counted as zero placeholders, not among the ranks, in JSON and text; told by content: a
    module whose lora_up alone is zero (an untrained LoRA) or whose bias is not zero is no placeholder."""
    from safetensors.torch import load_file
    from sdplugin_lora.format import ModuleWeights
    from sdplugin_lora.tools import lora_info, zero_placeholder

    path = trained[0]
    tensors = load_file(str(path))
    modules = {key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}
    # the trained modules are rank 4 (12 for a single block's linear1: q, k, v stacked); a left-out one rank 1, 2 for
    # final_layer.adaLN_modulation.1 (its lora_A written twice so diffusers' converter's half swap keeps it)
    left_out = {m for m in modules if tensors[f"{m}.lora_A.weight"].shape[0] < 4}
    assert {"double_blocks.0.img_mod.lin", "final_layer.adaLN_modulation.1"} <= left_out
    assert tensors["final_layer.adaLN_modulation.1.lora_A.weight"].shape[0] == 2 and len(left_out) < len(modules)
    info = lora_info(path)
    assert info["modules"] == len(modules) and info["zero_modules"] == len(left_out)
    assert 1 not in info["ranks"] and sum(info["ranks"].values()) == len(modules) - len(left_out)
    result = sd_cli(["lora", "info", str(path)], pm=pm)
    assert result.exit_code == 0, result.output
    assert f"zero:        {len(left_out)} zero placeholder modules (not trained)" in result.output
    result = sd_cli(["lora", "info", "--json", str(path)], pm=pm)
    assert json.loads(result.output)["zero_modules"] == len(left_out)

    zero = {"lora_down.weight": torch.zeros(1, 6), "lora_up.weight": torch.zeros(5, 1), "alpha": torch.tensor(1.0)}
    assert zero_placeholder(ModuleWeights(dict(zero)))
    assert not zero_placeholder(ModuleWeights({**zero, "lora_down.weight": torch.ones(1, 6)}))  # lora_up alone zero
    assert not zero_placeholder(ModuleWeights({**zero, "lora_up.bias": torch.ones(5)}))  # a bias changes the output


def test_diffusers_and_sdcore_load_the_biased_file_alike(trained, monkeypatch):
    """diffusers' ``load_lora_weights`` (PEFT with ``lora_bias``) + ``fuse_lora`` equals sdcore's merge (every
    tensor within 1e-5); sdcore's hooked ``<lora:...>`` load gives diffusers' unfused forward, and without the
    biases the forward differs (they are used)."""
    from safetensors.torch import load_file, save_file
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    path, _, _ = trained
    pipe = _diffusers_pipe(path, monkeypatch)
    assert any(".lora_B." in k and k.endswith(".bias") for k in pipe.transformer.state_dict())  # PEFT's lora_bias
    generator = torch.Generator().manual_seed(3)
    config = pipe.transformer.config
    inputs = {"hidden_states": torch.randn(1, 4, 128, generator=generator),
              "encoder_hidden_states": torch.randn(1, 8, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=generator),
              "timestep": torch.tensor([0.5]), "guidance": torch.tensor([30.0]), "img_ids": torch.zeros(4, 3),
              "txt_ids": torch.zeros(8, 3)}  # fmt: skip
    with torch.no_grad():
        theirs_forward = pipe.transformer(**inputs, return_dict=False)[0]
    dev = load_model("tiny:flux")
    applied = apply_lora(dev, path, 1.0, merge=False, widen=True)
    with torch.no_grad():
        ours_forward = dev.transformer(**inputs, return_dict=False)[0]
    applied.remove()
    assert torch.allclose(ours_forward, theirs_forward, atol=1e-5, rtol=0)
    no_bias = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".lora_B.bias")}
    save_file(no_bias, str(path.parent / "no-bias.safetensors"))
    applied = apply_lora(dev, path.parent / "no-bias.safetensors", 1.0, merge=False, widen=True)
    with torch.no_grad():
        without = dev.transformer(**inputs, return_dict=False)[0]
    applied.remove()
    assert float((without - theirs_forward).abs().max()) > 1e-4

    pipe.fuse_lora()
    theirs = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    applied = apply_lora(dev, path, 1.0, merge=True, widen=True)
    ours = dev.transformer.state_dict()
    assert set(ours) == set(theirs)
    gaps = {k: float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours}
    assert max(gaps.values()) <= 1e-5, sorted(gaps.items(), key=lambda kv: -kv[1])[:6]
    applied.remove()


@pytest.mark.parametrize("lora_layers", [None, "attn.to_q, ff.net.2", "proj_mlp,norm1.linear", "all-linear"])
def test_lora_layers_adapt_what_the_script_adapts(tmp_path, lora_layers):
    """The adapted modules are the script's ``target_modules`` over the (widened) tiny transformer's module names:
    its default list, given names plus x_embedder (PEFT's suffix match), or every Linear."""
    from sdcore.models.load import load_model
    from sdplugin_lora.method import LoraMethod

    data, controls = _pairs(tmp_path, 1)
    method = LoraMethod(_options(tmp_path, data, controls, lora_layers=lora_layers))
    bundle = load_model("tiny:flux")
    method.prepare(bundle)
    expected = _script_targets(bundle.transformer, lora_layers)
    assert "x_embedder" in expected and _adapted(method) == expected
    if lora_layers is None:  # not every Linear: the modulation and the single blocks' MLP are the script's gaps
        assert not any(p.endswith(("norm1.linear", "proj_mlp")) for p in expected)


def test_the_default_targets_train_and_the_trained_set_is_the_scripts(trained):
    from sdcore.models.flux.control import widen_img_in
    from sdcore.models.load import load_model

    _, _, adapted = trained
    dev = load_model("tiny:flux")
    widen_img_in(dev, 128, "test")
    assert adapted == _script_targets(dev.transformer, None)


def test_option_refusals_in_one_line_each(tmp_path):
    """--lora-bias without a layout that holds it, or on another algo; --lora-layers without --control-lora or with a
    name that matches no Linear (all such names listed)."""
    from sdcore.errors import ConfigError
    from sdcore.models.load import load_model
    from sdcore.testing.contract import contract_options
    from sdplugin_lora.method import LoraMethod

    o = contract_options(LoraMethod, tmp_path, {"lora_bias": True, "algo": "loha"}, family="flux")
    with pytest.raises(ConfigError) as err:
        LoraMethod(o).validate()
    text = str(err.value)
    assert "--lora-bias: lora_B.bias has a place in BFL's control layout (--control-lora) and PEFT's diffusers" in text
    assert "--lora-bias trains PEFT's lora_B bias of plain LoRA, not --algo loha" in text
    o = contract_options(LoraMethod, tmp_path, {"lora_bias": True, "algo": "locon"}, family="flux")
    with pytest.raises(ConfigError) as err:
        LoraMethod(o).validate()
    assert "not --algo locon" not in str(err.value) and "--lora-bias: lora_B.bias has a place" in str(err.value)
    o = contract_options(LoraMethod, tmp_path, {"lora_layers": "attn.to_q"}, family="flux")
    with pytest.raises(ConfigError, match=r"--lora-layers picks a control LoRA's modules .* give --control-lora"):
        LoraMethod(o).validate()
    data, controls = _pairs(tmp_path / "x", 1)
    method = LoraMethod(_options(tmp_path, data, controls, lora_layers="attn.to_q,attn,to_qq"))
    with pytest.raises(ConfigError, match=r"--lora-layers: 2 name\(s\) match no Linear .*: 'attn', 'to_qq'"):
        method.prepare(load_model("tiny:flux"))


def _merged_as_diffusers_fuses(out: Path, family: str) -> dict[str, torch.Tensor]:
    """diffusers' pipeline of the tiny ``family`` model, ``load_lora_weights`` + ``fuse_lora`` of the diffusers-layout
    file ``out``, against sdcore's merge of it: every transformer tensor within 1e-5. sdcore's merged state."""
    import diffusers
    from sdcore.models.load import load_model
    from sdplugin_lora.apply import apply_lora

    b = load_model(f"tiny:{family}")
    parts = {"scheduler": b.noise_scheduler, "vae": b.vae, "transformer": b.transformer}
    for i, (encoder, tokenizer) in enumerate(zip(b.text_encoders, b.tokenizers, strict=True)):
        suffix = f"_{i + 1}" if i else ""
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
    pipe = {"flux": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline}[family](**parts)
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    theirs = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    merged = load_model(f"tiny:{family}")
    apply_lora(merged, out, 1.0, merge=True)
    ours = merged.transformer.state_dict()
    gaps = {k: float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours}
    assert max(gaps.values()) <= 1e-5, sorted(gaps.items(), key=lambda kv: -kv[1])[:6]
    return ours


def test_lora_bias_in_the_diffusers_layout_of_a_plain_flux_lora(tmp_path):
    """--lora-bias --key-layout diffusers on a plain FLUX.1 LoRA: PEFT's ``lora_B.bias`` per diffusers module (a
    fused q/k/v's rows split per member), the header's config says ``lora_bias``, and diffusers'
    ``load_lora_weights`` + ``fuse_lora`` gives sdcore's merge."""
    from safetensors import safe_open
    from sdcore.models.load import load_model
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    out = tmp_path / "plain.safetensors"
    o = contract_options(LoraMethod, tmp_path, {"lora_bias": True, "key_layout": "diffusers", "rank": 2,
                                                 "max_steps": 2, "lr": 1e-2, "t5xxl_max_token_length": 8,
                                                 "output": str(out), "save_state": False}, family="flux")  # fmt: skip
    TrainSession(LoraMethod(o), bundle=None).run()
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["transformer.lora_bias"] is True
    assert {"transformer.transformer_blocks.0.attn.to_q.lora_B.bias",
            "transformer.transformer_blocks.0.attn.to_k.lora_B.bias"} <= keys  # fmt: skip
    ours = _merged_as_diffusers_fuses(out, "flux")
    fresh = load_model("tiny:flux").transformer.state_dict()["transformer_blocks.0.attn.to_q.bias"]
    assert float((ours["transformer_blocks.0.attn.to_q.bias"] - fresh).abs().max()) > 0  # the trained bias merged


def test_lora_bias_with_locon_in_the_diffusers_layout_conv_included(tmp_path):
    """``--algo locon`` is plain LoRA on every target (LyCORIS LoCon: ``up @ down`` on Linears and convs alike), so
    --lora-bias takes it: on FLUX.1 (no conv targets) every module gets its bias; on SD3 with the 2x2 patch conv
    adapted (``--extra-module-ranks x_embedder=2``, LoCon's conv path) the diffusers layout holds the conv's bias as
    PEFT's conv ``lora_B`` (a 1x1 conv built with ``bias=lora_bias``), and diffusers' ``load_lora_weights`` +
    ``fuse_lora`` gives sdcore's merge, the patch conv's bias and weight included."""
    from safetensors import safe_open
    from sdcore.models.load import load_model
    from sdcore.testing.contract import contract_options
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoconMethod, LoraMethod

    flux = contract_options(LoconMethod, tmp_path, {"lora_bias": True, "key_layout": "diffusers", "rank": 2},
                            family="flux")  # fmt: skip
    assert flux.algo == "locon"
    method = LoconMethod(flux)
    method.validate()
    method.prepare(load_model("tiny:flux"))
    modules = list(method.network.loras.values())
    assert modules and all(m.up_bias is not None for m in modules)

    out = tmp_path / "sd3-locon.safetensors"
    o = contract_options(LoraMethod, tmp_path, {"lora_bias": True, "key_layout": "diffusers", "algo": "locon",
                                                 "rank": 2, "extra_module_ranks": "x_embedder=2", "max_steps": 2,
                                                 "lr": 1e-2, "output": str(out), "save_state": False},
                         family="sd3")  # fmt: skip
    TrainSession(LoraMethod(o), bundle=None).run()
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("transformer.pos_embed.proj.lora_A.weight").dim() == 4  # the conv, by LoCon's path
        assert f.get_tensor("transformer.pos_embed.proj.lora_B.bias").shape == (16,)
        assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_bias"] is True
    ours = _merged_as_diffusers_fuses(out, "sd3")
    fresh = load_model("tiny:sd3").transformer.state_dict()
    for key in ("pos_embed.proj.bias", "pos_embed.proj.weight"):  # the trained conv change merged
        assert float((ours[key] - fresh[key]).abs().max()) > 0, key


# --- the JSONL dataset --------------------------------------------------------------------------------------------


def _solid(colour, side: int = 32) -> Image.Image:
    return Image.fromarray(np.broadcast_to(np.array(colour, dtype=np.uint8), (side, side, 3)).copy())


def _jsonl(root: Path, rows: list[dict]) -> Path:
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_a_jsonl_with_a_missing_control_image_is_one_line_before_any_model_loads(tmp_path, monkeypatch):
    import sdcore.models.load as load
    from sdcore.train.preflight import run_preflight
    from sdplugin_lora.method import LoraMethod

    (tmp_path / "images").mkdir()
    (tmp_path / "controls").mkdir()
    for i in range(3):
        _solid((40 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
        if i != 1:
            _solid((0, 40 * i, 0)).save(tmp_path / "controls" / f"c{i}.png")
    rows = [{"image": f"images/{i}.png", "conditioning_image": f"controls/c{i}.png", "text": "a square"}
            for i in range(3)]  # fmt: skip
    path = _jsonl(tmp_path, rows)

    def no_loading(*args, **kwargs):
        raise AssertionError("the pre-flight loaded the model")

    monkeypatch.setattr(load, "load_model", no_loading)
    o = _options(tmp_path, path, tmp_path / "controls")
    o.control_dir = None
    problems = run_preflight(LoraMethod(o), o, plan=False).problems
    mentioning = [p for p in problems if "train.jsonl" in p or "control" in p]
    assert mentioning == [
        f"{path}: 1 control image(s) not found (column 'conditioning_image', relative to {tmp_path} or the working "
        "directory): line 2: controls/c1.png"
    ]


def test_a_jsonl_trains_each_image_with_its_own_control_image(tmp_path, monkeypatch):
    """Rows whose control image shares no name with the image (and the diffusers column names given): each sample's
    cached control latents are those of its own row's control image. Each control image here is another row's
    training image, so with a sharp VAE (posterior std ~0) a sample's control latents equal that row's training
    latents and no other's; a caption list gives its longest, as the script's ``max(captions, key=len)``."""
    from sdcore.models.load import load_model
    from sdcore.train.data import SampleRef
    from sdcore.train.loop import TrainSession
    from sdplugin_lora.method import LoraMethod

    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 240, 20)]
    (tmp_path / "img").mkdir()
    for i, colour in enumerate(colours):
        _solid(colour).save(tmp_path / "img" / f"target_{i}.png")
    partner = [2, 3, 1, 0]  # row i's control image is row partner[i]'s training image
    rows = [{"target": f"img/target_{i}.png", "hint": str(tmp_path / "img" / f"target_{partner[i]}.png"),
             "prompt": ["a", f"a square number {i}"]} for i in range(4)]  # fmt: skip
    path = _jsonl(tmp_path, rows)
    monkeypatch.chdir(tmp_path / "img")  # relative paths are the JSONL folder's, not the working directory's
    bundle = load_model("tiny:flux")
    with torch.no_grad():
        conv = bundle.vae.encoder.conv_out  # a sharp VAE: the posterior's log-variance channels at -30
        conv.weight[16:].zero_()
        conv.bias[16:].fill_(-30.0)
    o = _options(tmp_path, path, tmp_path, image_column="target", conditioning_image_column="hint",
                 caption_column="prompt", cache_latents=True, resolution=32, min_bucket_reso=32, max_bucket_reso=32,
                 bucket_step=32, batch_size=4, max_steps=2, output=str(tmp_path / "out.safetensors"))  # fmt: skip
    o.control_dir = None
    session = TrainSession(LoraMethod(o), bundle=bundle)
    session.setup()
    entries = session.data.index.entries
    assert [e.path.name for e in entries] == [f"target_{i}.png" for i in range(4)]
    assert [e.caption for e in entries] == [f"a square number {i}" for i in range(4)]
    batch = session.make_batch([SampleRef(i, 0, -1) for i in range(4)])
    latents, controls = batch.latents.float(), batch.reference_latents.float()
    for i in range(4):
        gaps = [float((controls[i] - latents[j]).abs().max()) for j in range(4)]
        assert gaps[partner[i]] < 1e-3 and min(g for j, g in enumerate(gaps) if j != partner[i]) > 0.05, gaps
    session.run()
    assert Path(o.output).is_file()


def test_an_interrupted_lora_bias_run_resumes_exactly(tmp_path):
    """4 steps in one go == 2 steps, Ctrl-C, ``--resume latest``, 2 more, the lora_up biases included (the training
    state holds them as ``lora_up.bias``, read back into the modules' bias parameters)."""
    from sdcore.models.load import load_model
    from sdcore.testing.contract import check_resume, contract_options
    from sdcore.testing.datasets import write_inverted_controls
    from sdplugin_lora.method import LoraMethod

    contract_options(LoraMethod, tmp_path, family="flux")  # writes tmp_path/data
    controls = write_inverted_controls(tmp_path / "data", tmp_path / "controls")
    overrides = {"control_lora": True, "lora_bias": True, "control_dir": str(controls), "rank": 2,
                 "t5xxl_max_token_length": 8}  # fmt: skip
    check_resume(LoraMethod, tmp_path, overrides, family="flux")
    method = LoraMethod(contract_options(LoraMethod, tmp_path, overrides, family="flux"))
    method.prepare(load_model("tiny:flux"))
    state = method.trainable_state_dict()
    assert sum(key.endswith(".lora_up.bias") for key in state) == len(method.network.loras)


def test_the_training_forward_adds_the_bias_as_peft_lora_bias_does():
    """The training forward against PEFT's own layer (``LoraConfig(lora_bias=True)``, peft/tuners/lora/layer.py
    ``Linear.forward``: ``result + lora_B(lora_A(dropout(x))) * scaling``, lora_B's bias inside the scaling) on the
    same weights, alpha 2 over rank 4; a multiplier and per-sample strengths scale the bias with the rest. The file
    tests above check the saved bias against the trained one and the loaders against each other: this checks the
    trained forward itself, so a bias left unscaled while training (the file scaling it) is caught."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from sdplugin_lora.adapters import LoraAdapter, SharedDownLora

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(6, 3))
    theirs = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, lora_bias=True, target_modules=["0", "1"]),
                                     copy.deepcopy(base))  # fmt: skip
    with torch.no_grad():
        for layer in theirs:
            for p in (layer.lora_B["default"].weight, layer.lora_B["default"].bias):
                p.normal_()
    x = torch.randn(3, 2, 6)
    ours = LoraAdapter("a", base[0], 4, 2.0, lora_bias=True)
    shared = SharedDownLora("qkv", [("0", base[0]), ("1", base[1])], 4, 2.0, lora_bias=True)
    assert ours.up_bias is not None and shared.up_bias is not None
    with torch.no_grad():
        ours.lora_down.weight.copy_(theirs[0].lora_A["default"].weight)
        ours.lora_up.weight.copy_(theirs[0].lora_B["default"].weight)
        ours.up_bias.copy_(theirs[0].lora_B["default"].bias)
        shared.lora_down.weight.copy_(theirs[0].lora_A["default"].weight)
        theirs[1].lora_A["default"].weight.copy_(theirs[0].lora_A["default"].weight)  # one down for both members
        shared.lora_up.weight.copy_(torch.cat([theirs[i].lora_B["default"].weight for i in (0, 1)]))
        shared.up_bias.copy_(torch.cat([theirs[i].lora_B["default"].bias for i in (0, 1)]))
    plain = [layer(x) for layer in base]
    want = [layer(x) for layer in theirs]
    strengths = torch.tensor([1.0, 0.5, -1.0])
    for adapter, members in ((ours, (0,)), (shared, (0, 1))):
        adapter.train()
        adapter.attach()
        try:
            for i in members:
                torch.testing.assert_close(base[i](x), want[i], rtol=1e-5, atol=1e-6)
            adapter.multiplier = 0.5
            for i in members:
                torch.testing.assert_close(base[i](x) - plain[i], 0.5 * (want[i] - plain[i]), rtol=1e-5, atol=1e-6)
            adapter.multiplier = 1.0
            adapter.sample_strength = strengths
            for i in members:
                got = base[i](x) - plain[i]
                torch.testing.assert_close(got, strengths[:, None, None] * (want[i] - plain[i]), rtol=1e-5, atol=1e-6)
            adapter.sample_strength = None
        finally:
            adapter.detach()


def test_a_control_lora_run_without_guidance_scale_trains_and_samples_at_the_scripts_30(tmp_path):
    """diffusers' train_control_lora_flux.py trains (its L1241-1250: ``torch.full(..., args.guidance_scale)``) and
    validates (L140) at ``--guidance_scale``, default 30 (L543): a ``--control-lora`` run that gives no
    ``--guidance-scale`` does the same, in the step's call to the transformer, the samples without ``--g`` or
    ``--sample-cfg``, the file's ``ss_guidance_scale`` and the pre-flight's note; a given value (1.0 included) and a
    plain FLUX.1 run (1.0, kohya's examples) are as before (a kohya-named config: see the next test)."""
    from types import SimpleNamespace

    from sdcore.models.flux.control import TRAINING_WIDENER, widen_img_in
    from sdcore.models.load import load_model
    from sdcore.train.control_lora import control_lora_notes
    from sdcore.train.sample_prompts import read_sample_prompts
    from sdcore.train.sampling import _generations
    from sdcore.train.step import Objective
    from sdplugin_lora.method import LoraMethod, flow_metadata

    data, controls = _pairs(tmp_path, 1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"one --cn {controls / 'p0.png'}\n", encoding="utf-8")
    widened = load_model("tiny:flux")
    widen_img_in(widened, 128, TRAINING_WIDENER)
    plain = load_model("tiny:flux")

    def used(**extra):
        """(the step's guidance, the sample's, ss_guidance_scale) of a run with ``extra``."""
        o = _options(tmp_path, data, controls, sample_prompts=str(prompts), **extra)
        objective = Objective(SimpleNamespace(family="flux"), LoraMethod(o), o)
        seen: list[float] = []
        objective.adapter = SimpleNamespace(predict=lambda *args, guidance, **kwargs: seen.append(guidance))
        batch = SimpleNamespace(reference_latents=None, inpainting_mask=None)
        objective.predict(torch.zeros(1), torch.zeros(1), None, batch)  # type: ignore[arg-type]
        bundle = widened if o.control_lora else plain
        ((_, arguments),) = _generations(bundle, o, read_sample_prompts(str(prompts), "flux"), {})[2]
        return seen[0], arguments["cfg"], flow_metadata(o, "flux")["ss_guidance_scale"]

    assert used(guidance_scale=None) == (30.0, 30.0, "30.0")
    assert used(guidance_scale=1.0) == (1.0, 1.0, "1.0")
    assert used(guidance_scale=4.5, sample_cfg=6.0) == (4.5, 6.0, "4.5")
    # a plain FLUX.1 dev run: 1.0 while training, the family's 3.5 in samples (sdcore generate's)
    assert used(guidance_scale=None, control_lora=False) == (1.0, 3.5, "1.0")

    (note,) = control_lora_notes(_options(tmp_path, data, controls, guidance_scale=None))
    assert note.startswith("--control-lora: the guidance embedding gets 30 while training and in samples")
    assert "--guidance-scale not given: diffusers' train_control_lora_flux.py's default" in note
    (note,) = control_lora_notes(_options(tmp_path, data, controls, guidance_scale=2.0))
    assert "gets 2 while training" in note and "--guidance-scale given;" in note


def test_a_kohya_named_control_lora_config_without_guidance_scale_trains_at_the_scripts_30(tmp_path):
    """A config in the names diffusers' train_control_lora_flux.py shares with kohya (``pretrained_model_name_or_path``
    ...) is read as kohya's, but kohya's 3.5 is flux_train_network.py's default (sd-scripts
    library/flux_train_utils.py:649-651), a script that trains no control LoRA; the one trainer of this layout,
    diffusers' script, trains and validates at ``--guidance_scale`` default 30 (train_control_lora_flux.py:543, :1245).
    So such a run without ``guidance_scale`` trains at 30 (as the text encoder stays untrained there whatever kohya's
    default), and the pre-flight note does not call the value given; a given one (3.5 included) is used as given,
    and a kohya FLUX.1 LoRA without --control-lora keeps kohya's 3.5."""
    from sdcore.train.config import load_options
    from sdcore.train.control_lora import control_lora_notes
    from sdcore.train.objectives import training_guidance
    from sdplugin_lora.method import LoraOptions

    data, controls = _pairs(tmp_path, 1)

    def read(body: str) -> tuple[LoraOptions, list[str]]:
        config = tmp_path / "kohya.toml"
        config.write_text(f'pretrained_model_name_or_path = "tiny:flux"\ntrain_data_dir = "{data}"\n{body}',
                          encoding="utf-8")  # fmt: skip
        notes: list[str] = []
        return load_options(LoraOptions, config, notes=notes), notes

    control = f'control_dir = "{controls}"\ncontrol_lora = true\n'
    o, notes = read(control)
    assert o.guidance_scale is None and training_guidance(o, control=True) == 30.0
    assert not any("guidance_scale defaults to 3.5" in n for n in notes)
    (note,) = control_lora_notes(o)
    assert "gets 30 while training" in note and "--guidance-scale not given" in note
    o, _ = read(control + "guidance_scale = 3.5\n")
    assert training_guidance(o, control=True) == 3.5
    o, notes = read("")
    assert o.guidance_scale == 3.5 and any("guidance_scale defaults to 3.5" in n for n in notes)
