"""``sdcore lora resize``/``merge``/``convert`` keep what the source file is: diffusers' PEFT layout stays in it with a
``lora_adapter_metadata`` header written for the new ranks and alphas (diffusers builds its LoraConfig from that
header alone, so an old one would fuse wrong weights), no hash of the source survives, and ``convert`` keeps the
source's dtype unless ``--save-dtype`` says otherwise.

The oracle is diffusers itself: the source files are written by ``save_lora_weights`` from PEFT adapters on the tiny
SD1 pipeline, and the written files are loaded with ``load_lora_weights`` + ``fuse_lora``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from lora_testutil import all_params, fresh_bundle
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sdcore.models.hashes import autov3_hash
from sdplugin_lora.apply import apply_lora
from sdplugin_lora.commands import lora_group
from sdplugin_lora.format import PEFT_LAYOUT, read_lora

#: the hashes a source file carries, which must not survive in what is written from it
STALE = {"sshs_model_hash": "a" * 64, "sshs_legacy_hash": "b" * 8, "modelspec.hash_sha256": "0x" + "c" * 64}


def _pipeline(bundle):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                   tokenizer=bundle.tokenizers[0], unet=bundle.unet, scheduler=bundle.noise_scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip


def _peft_file(path, *, seed=0, rslora=False):
    """A diffusers LoRA as ``save_lora_weights`` writes it: UNet attention (rank 4, alpha 2; ``attn2.to_k`` rank 3,
    alpha 6) and CLIP q/v (rank 2, alpha 4), random factors, the PEFT configs in the header; ``STALE`` hashes added."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    bundle = fresh_bundle("sd1")
    unet_config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                             rank_pattern={"attn2.to_k": 3}, alpha_pattern={"attn2.to_k": 6}, init_lora_weights=False,
                             use_rslora=rslora)  # fmt: skip
    te_config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    bundle.unet.add_adapter(unet_config)
    text_encoder = inject_adapter_in_model(te_config, bundle.text_encoders[0])  # PEFT's own (transformers' needs 0.22)
    te_layers = {
        key.replace(".default", ""): value for key, value in text_encoder.state_dict().items() if "lora_" in key
    }
    StableDiffusionPipeline.save_lora_weights(
        path.parent / "peft",
        unet_lora_layers=get_peft_model_state_dict(bundle.unet),
        text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    written = path.parent / "peft" / "pytorch_lora_weights.safetensors"
    with safe_open(str(written), framework="pt") as handle:
        meta = dict(handle.metadata())
    save_file(load_file(str(written)), str(path), metadata={**meta, **STALE})
    return path


def _diffusers_fused(path, scale=1.0):
    bundle = fresh_bundle("sd1")
    pipe = _pipeline(bundle)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale)
    pipe.unload_lora_weights()
    return all_params(bundle)


def _sdcore_merged(*paths_and_ratios):
    bundle = fresh_bundle("sd1")
    for path, ratio in paths_and_ratios:
        apply_lora(bundle, path, ratio, merge=True)
    return all_params(bundle)


def _close(got, want, atol=1e-5):
    assert got.keys() == want.keys()
    worst = max(float((got[key] - want[key]).abs().max()) for key in want)
    assert worst <= atol, worst


def _run(*args):
    result = CliRunner().invoke(lora_group, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def _header(path):
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata()), list(handle.keys())


def _check_hashes(path, meta):
    """The written file's hashes are its own: A1111's (sshs_model_hash) and modelspec's are the sha256 of its data."""
    data_hash = autov3_hash(path)
    assert meta["sshs_model_hash"] == data_hash != STALE["sshs_model_hash"]
    assert meta["sshs_legacy_hash"] != STALE["sshs_legacy_hash"]
    assert meta["modelspec.hash_sha256"] == "0x" + data_hash


def test_resize_of_a_diffusers_file_keeps_its_layout_with_a_header_of_the_new_ranks(tmp_path):
    """Resized to rank 2: lora_A/lora_B only, no .alpha tensor (diffusers refuses one: "Invalid LoRA checkpoint"), the
    header's r/lora_alpha/patterns the new ones (alpha = old alpha/old rank * 2: 1 for the UNet, 4 for attn2.to_k, 4
    for CLIP); diffusers fuses exactly the weights sdcore applies. Resized to the ranks it has (rank 4): diffusers
    fuses the source file's weights, which the old header (attn2.to_k at rank 3, alpha 6) could not give."""
    source = _peft_file(tmp_path / "peft.safetensors")
    assert read_lora(source).layout == PEFT_LAYOUT
    small, same = tmp_path / "r2.safetensors", tmp_path / "r4.safetensors"
    _run("resize", source, "-o", small, "--rank", "2", "--save-dtype", "fp32")
    _run("resize", source, "-o", same, "--rank", "4", "--save-dtype", "fp32")

    meta, keys = _header(small)
    assert keys and all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)
    assert {key.split(".", 1)[0] for key in keys} == {"unet", "text_encoder"}
    header = json.loads(meta["lora_adapter_metadata"])
    assert (header["unet.r"], header["unet.lora_alpha"], header["unet.rank_pattern"]) == (2, 1, {})
    assert (header["text_encoder.r"], header["text_encoder.lora_alpha"]) == (2, 4)
    to_k = {key.removeprefix("unet.") for key in read_lora(source).modules if key.endswith("attn2.to_k")}
    assert len(to_k) == 4 and header["unet.alpha_pattern"] == dict.fromkeys(to_k, 4)
    assert "unet.use_rslora" not in header and meta["format"] == "pt"
    _check_hashes(small, meta)
    _close(_diffusers_fused(small), _sdcore_merged((small, 1.0)))

    meta4, _ = _header(same)
    header4 = json.loads(meta4["lora_adapter_metadata"])
    # every module at rank 4 now (resize writes the cap, as kohya's), attn2.to_k at alpha 6/3 * 4
    assert (header4["unet.r"], header4["unet.rank_pattern"], header4["unet.lora_alpha"]) == (4, {}, 2)
    assert header4["unet.alpha_pattern"] == dict.fromkeys(to_k, 8)
    original = _diffusers_fused(source, 0.8)
    _close(_diffusers_fused(same, 0.8), original)
    _close(_sdcore_merged((same, 0.8)), original)


def test_merge_of_diffusers_files_is_one_diffusers_file(tmp_path):
    """concat of two diffusers files: one file of their layout (ranks stacked, alpha = rank in the header), which
    diffusers fuses to what sdcore gives applying both sources at their ratios."""
    first, second = _peft_file(tmp_path / "a.safetensors", seed=1), _peft_file(tmp_path / "b.safetensors", seed=2)
    merged = tmp_path / "merged.safetensors"
    result = _run("merge", f"{first}:1.0", f"{second}:0.5", "-o", merged, "--save-dtype", "fp32")
    meta, keys = _header(merged)
    assert all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in keys)
    assert f"{len(keys) // 2} modules" in result.output
    header = json.loads(meta["lora_adapter_metadata"])
    assert (header["unet.r"], header["unet.lora_alpha"], header["text_encoder.r"]) == (8, 8, 4)
    assert set(header["unet.rank_pattern"].values()) == {6} == set(header["unet.alpha_pattern"].values())
    assert meta["sshs_model_hash"] == autov3_hash(merged)
    _close(_diffusers_fused(merged), _sdcore_merged((first, 1.0), (second, 0.5)))


def test_rslora_header_reads_as_diffusers_reads_it(tmp_path):
    """PEFT's rsLoRA scales by alpha/sqrt(r): sdcore applies such a file as diffusers fuses it, and its resize (a
    kohya-alpha header without use_rslora) fuses in diffusers to the same weights."""
    source = _peft_file(tmp_path / "rs.safetensors", rslora=True)
    assert json.loads(_header(source)[0]["lora_adapter_metadata"])["unet.use_rslora"] is True
    original = _diffusers_fused(source)
    _close(_sdcore_merged((source, 1.0)), original)
    resized = tmp_path / "rs4.safetensors"
    _run("resize", source, "-o", resized, "--rank", "4", "--save-dtype", "fp32")
    _close(_diffusers_fused(resized), original)


def test_resize_of_a_kohya_file_drops_a_peft_header(tmp_path):
    """A kohya-layout file carrying a PEFT header (a tool that copied it over): the resized file's alphas are its
    tensors, and the old header (rank 8, alpha 1 here) is gone rather than describing modules it does not have."""
    gen = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {f"{name}.lora_down.weight": torch.randn(4, 32, generator=gen),
             f"{name}.lora_up.weight": torch.randn(32, 4, generator=gen), f"{name}.alpha": torch.tensor(2.0)}  # fmt: skip
    source, out = tmp_path / "kohya.safetensors", tmp_path / "out.safetensors"
    save_file(state, str(source), {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 1}), **STALE})
    _run("resize", source, "-o", out, "--rank", "2")
    meta, keys = _header(out)
    assert "lora_adapter_metadata" not in meta and f"{name}.alpha" in keys
    assert float(load_file(str(out))[f"{name}.alpha"]) == 1.0  # 2/4 * 2
    _check_hashes(out, meta)


def _xlabs(path, dtypes):
    """A tiny x-flux file whose tensors take ``dtypes`` in turn."""
    from test_foreign_layouts import _xlabs_state

    state = _xlabs_state(seed=5)
    state = {key: state[key].to(dtypes[i % len(dtypes)]) for i, key in enumerate(sorted(state))}
    save_file(state, str(path), {**STALE})
    return path


@pytest.mark.parametrize(
    ("dtypes", "option", "want"),
    [
        ((torch.float16,), (), torch.float16),
        ((torch.bfloat16,), (), torch.bfloat16),
        ((torch.float32,), (), torch.float32),
        ((torch.float16, torch.bfloat16), (), torch.float32),  # neither holds the other
        ((torch.float16, torch.float32), (), torch.float32),
        ((torch.bfloat16,), ("--save-dtype", "fp16"), torch.float16),
    ],
)
def test_convert_keeps_the_source_dtype(tmp_path, dtypes, option, want):
    """``convert`` writes the dtype the source's weights have (mixed: the widest) unless --save-dtype is given: an
    fp16 file's tensors stay fp16 (half the bytes of the fp32 the old default wrote), and it says which."""
    source, out = _xlabs(tmp_path / "xlabs.safetensors", dtypes), tmp_path / "kohya.safetensors"
    result = _run("convert", source, "-o", out, "--to", "kohya", *option)
    written = load_file(str(out))
    assert {tensor.dtype for tensor in written.values()} == {want}
    name = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[want]
    assert f"wrote {out} ({name}):" in result.output
    meta, _ = _header(out)
    _check_hashes(out, meta)


def _factors(key, rank, width, gen, suffixes=(".lora_A.weight", ".lora_B.weight")):
    return {key + suffixes[0]: torch.randn(rank, width, generator=gen),
            key + suffixes[1]: torch.randn(width, rank, generator=gen)}  # fmt: skip


_UNET = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
_TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
_TE2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
_KOHYA = ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (".lora_down.weight", ".lora_up.weight"))


@pytest.mark.parametrize(
    ("keys", "extra", "want"),
    [
        ([_UNET, _TE, _TE2], {}, PEFT_LAYOUT),  # SDXL: unet, text_encoder, text_encoder_2
        (
            ["transformer.single_transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_q"],
            {},
            PEFT_LAYOUT,
        ),  # SD3/FLUX.1: transformer
        ([_UNET], {f"{_UNET}.alpha": torch.tensor(2.0)}, ""),  # an .alpha tensor: not what diffusers writes
        ([_UNET, _KOHYA], {}, ""),  # mixed: one kohya module makes the file kohya's
        (["lora_unet_down_blocks_1_attentions_0_proj_in"], {}, ""),  # kohya names with PEFT suffixes
        (["diffusion_model.double_blocks.0.img_attn.proj"], {}, ""),  # BFL/ComfyUI names
    ],
)
def test_peft_layout_is_every_module_under_a_diffusers_component(keys, extra, want):
    """``layout`` is PEFT only when every module is ``<diffusers component>.<path>.lora_A/lora_B``: a file that mixes
    in kohya modules or ``.alpha`` tensors, or uses kohya's or BFL's names, is written in kohya's layout."""
    from sdplugin_lora.format import parse_state_dict

    gen = torch.Generator().manual_seed(0)
    state = dict(extra)
    for key in keys:
        name, suffixes = key if isinstance(key, tuple) else (key, (".lora_A.weight", ".lora_B.weight"))
        state.update(_factors(name, 2, 8, gen, suffixes))
    assert parse_state_dict(state).layout == want


def test_resize_of_an_sdxl_diffusers_file_writes_one_config_per_text_encoder(tmp_path):
    """SDXL's second text encoder has its own LoraConfig (``text_encoder_2.*`` keys, which diffusers' prefix filter
    ``text_encoder.`` does not take); a mixed file (a kohya module beside PEFT ones) is written in kohya's layout
    with no PEFT header."""
    gen = torch.Generator().manual_seed(1)
    state = {**_factors(_UNET, 4, 16, gen), **_factors(_TE, 4, 16, gen), **_factors(_TE2, 6, 16, gen)}
    header = {"unet.r": 4, "unet.lora_alpha": 4, "text_encoder.r": 4, "text_encoder.lora_alpha": 2,
              "text_encoder_2.r": 6, "text_encoder_2.lora_alpha": 3}  # fmt: skip
    source, out = tmp_path / "xl.safetensors", tmp_path / "xl2.safetensors"
    save_file(
        state, str(source), {"lora_adapter_metadata": json.dumps(header), "ss_base_model_version": "sdxl_base_v1-0"}
    )
    _run("resize", source, "-o", out, "--rank", "2", "--save-dtype", "fp32")
    meta, keys = _header(out)
    written = json.loads(meta["lora_adapter_metadata"])
    assert {k: v for k, v in written.items() if k.endswith((".r", ".lora_alpha"))} == {
        "unet.r": 2, "unet.lora_alpha": 2, "text_encoder.r": 2, "text_encoder.lora_alpha": 1,
        "text_encoder_2.r": 2, "text_encoder_2.lora_alpha": 1}  # fmt: skip
    assert written["text_encoder_2.target_modules"] == [_TE2.split(".", 1)[1]]
    assert sorted(keys) == sorted(f"{m}.lora_{p}.weight" for m in (_UNET, _TE, _TE2) for p in "AB")

    kohya = _factors(_KOHYA[0], 4, 16, gen, _KOHYA[1])
    mixed, mixed_out = tmp_path / "mixed.safetensors", tmp_path / "mixed2.safetensors"
    save_file({**_factors(_UNET, 4, 16, gen), **kohya, f"{_KOHYA[0]}.alpha": torch.tensor(2.0)}, str(mixed),
              {"lora_adapter_metadata": json.dumps(header)})  # fmt: skip
    _run("resize", mixed, "-o", mixed_out, "--rank", "2", "--save-dtype", "fp32")
    meta, keys = _header(mixed_out)
    assert "lora_adapter_metadata" not in meta
    assert f"{_UNET}.alpha" in keys and f"{_KOHYA[0]}.alpha" in keys and not any(".lora_A." in k for k in keys)


@pytest.mark.parametrize(
    ("weights", "alpha", "want"),
    [
        (torch.float16, torch.float32, "fp16"),  # kohya's fp16 files keep a float32 0-d alpha: it does not count
        (torch.bfloat16, torch.float64, "bf16"),
        (torch.float32, torch.float16, "fp32"),
    ],
)
def test_source_dtype_leaves_out_0d_alphas(weights, alpha, want):
    from sdplugin_lora.format import parse_state_dict, source_save_dtype

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    state = {f"{name}.lora_down.weight": torch.ones(2, 8, dtype=weights),
             f"{name}.lora_up.weight": torch.ones(8, 2, dtype=weights), f"{name}.alpha": torch.tensor(1.0, dtype=alpha)}  # fmt: skip
    assert source_save_dtype(parse_state_dict(state)) == want
