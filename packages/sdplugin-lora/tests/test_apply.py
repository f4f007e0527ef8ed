"""Applying files: hooks == merge, exact undo, foreign key styles, wrong family, unmatched keys."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from lora_testutil import all_params, fresh_bundle, random_network, te_out, unet_inputs, unet_out
from safetensors.torch import save_file
from sdcore.errors import NetworkMismatchError, UnsafeFileError
from sdcore.generate.networks import NetworkRef
from sdplugin_lora.apply import LoraHandler, LoraSpec, LoraWarning, apply_lora, apply_loras
from sdplugin_lora.format import network_metadata, read_lora, save_lora


def _save(bundle, tmp_path, name="l.safetensors", seed=0, **kw):
    network = random_network(bundle, seed=seed, **kw)
    meta = network_metadata(family=bundle.family, prediction_type=bundle.prediction_type, rank=4, alpha=2)
    return save_lora(tmp_path / name, network.state_dict(), meta, dtype="fp32")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_hooks_equal_merge_and_undo_is_exact(family, tmp_path):
    path = _save(fresh_bundle(family), tmp_path)
    inputs = unet_inputs(fresh_bundle(family))
    bundle = fresh_bundle(family)
    base_params = all_params(bundle)
    base_out = unet_out(bundle, inputs)
    base_te = te_out(bundle)

    hooked = apply_lora(bundle, path, 0.6, unet_weight=0.8, merge=False)
    assert all(torch.equal(v, all_params(bundle)[k]) for k, v in base_params.items()), "hooks change no weight"
    hooked_out, hooked_te = unet_out(bundle, inputs), te_out(bundle)
    hooked.remove()
    assert torch.equal(unet_out(bundle, inputs), base_out)

    merged = apply_lora(bundle, path, 0.6, unet_weight=0.8, merge=True)
    merged_out, merged_te = unet_out(bundle, inputs), te_out(bundle)
    assert (merged_out - base_out).abs().max() > 1e-3, "the LoRA must change the output"
    assert (merged_te - base_te).abs().max() > 1e-3
    torch.testing.assert_close(hooked_out, merged_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(hooked_te, merged_te, atol=1e-5, rtol=0)
    merged.remove()
    after = all_params(bundle)
    assert all(torch.equal(v, after[k]) for k, v in base_params.items()), "undo restores bit for bit"


def test_half_precision_base_undo_bit_exact_and_lora_fp32(tmp_path):
    bundle = fresh_bundle("sd1").to(dtype=torch.float16)
    path = _save(fresh_bundle("sd1"), tmp_path)
    before = all_params(bundle)
    applied = apply_loras(bundle, [LoraSpec(path, 1.0), LoraSpec(path, -0.3)], merge=True)
    assert any(not torch.equal(before[k], v) for k, v in all_params(bundle).items())
    applied.remove()
    assert all(torch.equal(before[k], v) for k, v in all_params(bundle).items())
    hooked = apply_lora(bundle, path, merge=False)
    assert all(m.lora_down.weight.dtype == torch.float32 for m in hooked.modules)
    latents, t, hidden, _ = unet_inputs(bundle)
    with torch.no_grad():
        out = bundle.unet(latents.half(), t, encoder_hidden_states=hidden.half()).sample
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    hooked.remove()


def _kohya_sd1_file(tmp_path):
    """A kohya SD1 LoCon file built by hand from the naming rule (not by our writer)."""
    bundle = fresh_bundle("sd1")
    g = torch.Generator().manual_seed(3)
    tensors = {}
    picks = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": None,
        "down_blocks.0.attentions.0.proj_in": None,
        "down_blocks.0.resnets.0.conv1": 3,  # LoCon 3x3
        "down_blocks.0.downsamplers.0.conv": 2,
        "down_blocks.1.resnets.0.conv_shortcut": None,
        "mid_block.resnets.0.time_emb_proj": None,
    }
    modules = dict(bundle.unet.named_modules())
    for path, conv_rank in picks.items():
        name = "lora_unet_" + path.replace(".", "_")
        weight = modules[path].weight
        rank = conv_rank or 3
        if weight.dim() == 4:
            down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=g)
            up = torch.randn(weight.shape[0], rank, 1, 1, generator=g)
        else:
            down = torch.randn(rank, weight.shape[1], generator=g)
            up = torch.randn(weight.shape[0], rank, generator=g)
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        if path != "mid_block.resnets.0.time_emb_proj":  # a missing alpha means alpha = rank
            tensors[f"{name}.alpha"] = torch.tensor(1.0).half()
    te = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    layer = bundle.text_encoders[0].encoder.layers[1].mlp.fc2.weight
    tensors[f"{te}.lora_down.weight"] = torch.randn(2, layer.shape[1], generator=g).half()
    tensors[f"{te}.lora_up.weight"] = torch.randn(layer.shape[0], 2, generator=g).half()
    tensors[f"{te}.alpha"] = torch.tensor(4.0).half()
    save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata={"ss_network_module": "networks.lora"})
    return tmp_path / "kohya.safetensors", tensors, picks


def test_foreign_kohya_locon_file_applies_with_kohya_math(tmp_path):
    path, tensors, picks = _kohya_sd1_file(tmp_path)
    bundle = fresh_bundle("sd1")
    modules = dict(bundle.unet.named_modules())
    before = {p: modules[p].weight.detach().clone() for p in picks}
    applied = apply_lora(bundle, path, 0.5, merge=True)
    assert applied.touched == len(picks) + 1
    for p in picks:
        name = "lora_unet_" + p.replace(".", "_")
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(tensors.get(f"{name}.alpha", torch.tensor(float(rank))))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(before[p].shape)
        torch.testing.assert_close(modules[p].weight, before[p] + 0.5 * alpha / rank * delta, atol=1e-5, rtol=1e-6)


def test_sdxl_sgm_and_peft_keys_resolve(tmp_path):
    bundle = fresh_bundle("sdxl")
    g = torch.Generator().manual_seed(1)
    q = bundle.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    op = bundle.unet.down_blocks[0].downsamplers[0].conv
    kohya = {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 64, generator=g),
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(64, 2, generator=g),
        "lora_unet_input_blocks_2_0_op.lora_down.weight": torch.randn(2, 32, 3, 3, generator=g),
        "lora_unet_input_blocks_2_0_op.lora_up.weight": torch.randn(32, 2, 1, 1, generator=g),
    }
    save_file(kohya, str(tmp_path / "sgm.safetensors"))
    before_q, before_op = q.weight.detach().clone(), op.weight.detach().clone()
    applied = apply_lora(bundle, tmp_path / "sgm.safetensors", 1.0, merge=True)
    assert applied.touched == 2
    want = (
        before_q
        + kohya["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight"]
        @ kohya["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    )
    torch.testing.assert_close(q.weight, want, atol=1e-5, rtol=0)
    assert not torch.equal(op.weight, before_op)
    applied.remove()

    te2 = bundle.text_encoders[1].text_model.encoder.layers[0].self_attn.v_proj
    peft = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(
            2, 64, generator=g
        ),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(
            64, 2, generator=g
        ),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight": torch.randn(2, 64, generator=g),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight": torch.randn(64, 2, generator=g),
    }
    save_file(peft, str(tmp_path / "peft.safetensors"))
    before_v = te2.weight.detach().clone()
    applied = apply_lora(bundle, tmp_path / "peft.safetensors", 1.0, merge=True)
    assert applied.touched == 2
    want_v = (
        before_v
        + peft["text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_B.weight"]
        @ peft["text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj.lora_A.weight"]
    )
    torch.testing.assert_close(te2.weight, want_v, atol=1e-5, rtol=0)


def test_wrong_family_refused_with_its_name(tmp_path):
    sdxl_file = _save(fresh_bundle("sdxl"), tmp_path, "xl.safetensors")
    with pytest.raises(NetworkMismatchError, match="made for sdxl"):
        apply_lora(fresh_bundle("sd1"), sdxl_file)
    sd1_file = _save(fresh_bundle("sd1"), tmp_path, "v1.safetensors")
    with pytest.raises(NetworkMismatchError, match=r"made for sd1.*loaded model is sd2"):
        apply_lora(fresh_bundle("sd2"), sd1_file)
    # no metadata: te1/te2 keys still say SDXL
    tensors = {k: v for k, v in read_lora(sdxl_file).kohya_state_dict().items()}
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(NetworkMismatchError, match="made for sdxl"):
        apply_lora(fresh_bundle("sd1"), tmp_path / "bare.safetensors")


def test_real_width_detection():
    from sdplugin_lora.format import detect_family, parse_state_dict

    state = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 1024),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4),
    }
    assert detect_family(parse_state_dict(state))[0] == "sd2"


def test_unmatched_keys_listed_warning_and_strict(tmp_path):
    bundle = fresh_bundle("sd1")
    network = random_network(bundle, conv_rank=0)
    state = dict(network.state_dict())
    state["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(4, 8)
    state["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(8, 4)
    state["something_else.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.warns(LoraWarning, match="lora_unet_not_a_module.*something_else.weight"):
        applied = apply_lora(bundle, tmp_path / "extra.safetensors")
    assert applied.touched == len(network)
    applied.remove()
    with pytest.raises(NetworkMismatchError, match="lora_unet_not_a_module"):
        apply_lora(bundle, tmp_path / "extra.safetensors", strict=True)
    # wrong shapes: refused, model untouched
    bad = {
        k: (torch.zeros(4, 99) if k.endswith("attn1_to_q.lora_down.weight") else v)
        for k, v in network.state_dict().items()
    }
    save_file(bad, str(tmp_path / "bad.safetensors"))
    before = all_params(bundle)
    with pytest.raises(NetworkMismatchError, match="does not fit"):
        apply_lora(bundle, tmp_path / "bad.safetensors", merge=True)
    assert all(torch.equal(before[k], v) for k, v in all_params(bundle).items())


def test_handler_activate_and_undo(tmp_path):
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    path = _save(fresh_bundle("sd1"), lora_dir, "style.safetensors")
    bundle = fresh_bundle("sd1")
    inputs = unet_inputs(bundle)
    before = all_params(bundle)
    handler = LoraHandler(lora_dir)
    ref = NetworkRef("lora", "style", (0.5, 1.0), "<lora:style:0.5:1.0>")
    activation = handler.activate(bundle, [ref], "a cat <lora:style:0.5:1.0>", "")
    assert "<lora" not in activation.prompt
    assert activation.info["Lora hashes"] == f"style: {read_lora(path).metadata['sshs_model_hash'][:12]}"
    changed = unet_out(bundle, inputs)
    expected_bundle = fresh_bundle("sd1")
    apply_lora(expected_bundle, path, 0.5, unet_weight=1.0, merge=False)
    torch.testing.assert_close(changed, unet_out(expected_bundle, inputs), atol=1e-5, rtol=0)
    activation.undo()
    assert all(torch.equal(before[k], v) for k, v in all_params(bundle).items())
    with pytest.raises(NetworkMismatchError, match="not found"):
        handler.activate(bundle, [NetworkRef("lora", "missing")], "", "")


def test_loha_and_lokr_files_merge_with_lycoris_math(tmp_path):
    bundle = fresh_bundle("sd1")
    layer = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_v
    g = torch.Generator().manual_seed(5)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v"
    t = {
        f"{name}.hada_w1_a": torch.randn(32, 2, generator=g),
        f"{name}.hada_w1_b": torch.randn(2, 32, generator=g),
        f"{name}.hada_w2_a": torch.randn(32, 2, generator=g),
        f"{name}.hada_w2_b": torch.randn(2, 32, generator=g),
        f"{name}.alpha": torch.tensor(1.0),
    }
    save_file(t, str(tmp_path / "loha.safetensors"))
    before = layer.weight.detach().clone()
    hooked_bundle = fresh_bundle("sd1")
    inputs = unet_inputs(bundle)
    hooked = apply_lora(hooked_bundle, tmp_path / "loha.safetensors", merge=False)
    applied = apply_lora(bundle, tmp_path / "loha.safetensors", merge=True)
    want = before + 0.5 * (t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]) * (
        t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"]
    )
    torch.testing.assert_close(layer.weight, want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(unet_out(hooked_bundle, inputs), unet_out(bundle, inputs), atol=1e-4, rtol=0)
    applied.remove()
    hooked.remove()

    lokr = {f"{name}.lokr_w1": torch.randn(4, 4, generator=g), f"{name}.lokr_w2": torch.randn(8, 8, generator=g)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    apply_lora(bundle, tmp_path / "lokr.safetensors", 0.5, merge=True)
    torch.testing.assert_close(
        layer.weight, before + 0.5 * torch.kron(lokr[f"{name}.lokr_w1"], lokr[f"{name}.lokr_w2"])
    )


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"lora_unet_x.lora_down.weight": Evil()}, handle)
    with pytest.raises(UnsafeFileError, match=r"evil\.pt"):
        read_lora(path)
    assert not marker.exists()
    # a plain tensor .pt file loads
    torch.save(
        {
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2),
        },
        tmp_path / "ok.pt",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert apply_lora(fresh_bundle("sd1"), tmp_path / "ok.pt").touched == 1


def test_peft_alpha_from_diffusers_header(tmp_path):
    bundle = fresh_bundle("sd1")
    layer = bundle.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    header = {"lora_adapter_metadata": '{"unet.lora_alpha": 2, "unet.r": 4}'}
    save_file(
        {f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(tmp_path / "p.safetensors"), metadata=header
    )
    before = layer.weight.detach().clone()
    apply_lora(bundle, tmp_path / "p.safetensors", merge=True)
    torch.testing.assert_close(layer.weight, before + 0.5 * b @ a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["merge", "hooks"])
def test_generate_session_routes_lora_tags(tmp_path, mode):
    from sdcore.generate.session import NetworkSession

    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    path = _save(fresh_bundle("sd1"), lora_dir, "style.safetensors")
    bundle = fresh_bundle("sd1")
    inputs = unet_inputs(bundle)
    before, base_out = all_params(bundle), unet_out(bundle, inputs)
    handler = LoraHandler(lora_dir)
    handler.options = {"lora_mode": mode}
    session = NetworkSession({"lora": handler})
    with session.apply(bundle, "a cat <lora:style:0.5:1.0>, sitting") as applied:
        assert "<lora" not in applied.prompt and "Lora hashes" in applied.info
        inside = unet_out(bundle, inputs)
        assert (all(torch.equal(before[k], v) for k, v in all_params(bundle).items())) == (mode == "hooks")
    reference = fresh_bundle("sd1")
    apply_lora(reference, path, 0.5, unet_weight=1.0)
    torch.testing.assert_close(inside, unet_out(reference, inputs), atol=1e-5, rtol=0)
    assert torch.equal(unet_out(bundle, inputs), base_out)
    assert all(torch.equal(before[k], v) for k, v in all_params(bundle).items())


def test_named_weights_split_text_encoder_and_unet(tmp_path):
    """<lora:x:te=0:unet=1> leaves the text encoder alone and applies the UNet part fully."""
    from sdcore.generate.session import NetworkSession

    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    source = fresh_bundle("sd1")
    path = _save(source, lora_dir, "both.safetensors", text_encoder=True)
    bundle = fresh_bundle("sd1")
    te_before = {k: v.clone() for k, v in bundle.text_encoders[0].state_dict().items()}
    unet_before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    session = NetworkSession({"lora": LoraHandler(lora_dir)})
    with session.apply(bundle, "a cat <lora:both:te=0:unet=1>"):
        te_inside = bundle.text_encoders[0].state_dict()
        assert all(torch.equal(te_before[k], v) for k, v in te_inside.items())
        assert any(not torch.equal(unet_before[k], v) for k, v in bundle.unet.state_dict().items())
    reference = fresh_bundle("sd1")
    apply_lora(reference, path, 0.0, unet_weight=1.0, merge=True)
    with session.apply(bundle, "a cat <lora:both:te=0:unet=1>"):
        for key, value in bundle.unet.state_dict().items():
            torch.testing.assert_close(value, reference.unet.state_dict()[key], atol=1e-6, rtol=0)


def test_handler_picks_only_lora_files_and_lists_ambiguous_ones(tmp_path):
    # issue 17: with --lora-dir out, <lora:mychar> picked the APT embedding out/apt/mychar.pt
    out = tmp_path / "out"
    (out / "apt").mkdir(parents=True)
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}, "name": "mychar", "step": 10}, out / "apt" / "mychar.pt")
    handler = LoraHandler(out)
    with pytest.raises(NetworkMismatchError, match=r"no LoRA file of that name .*apt/mychar\.pt is not a LoRA"):
        handler.find("mychar")
    lora = _save(fresh_bundle("sd1"), out, "mychar.safetensors")
    assert handler.find("mychar") == lora
    activation = handler.activate(fresh_bundle("sd1"), [NetworkRef("lora", "mychar")], "<lora:mychar>", "")
    assert "mychar" in activation.info["Lora hashes"]
    (out / "old").mkdir()
    other = _save(fresh_bundle("sd1"), out / "old", "mychar.safetensors", seed=1)
    with pytest.raises(NetworkMismatchError, match="ambiguous") as info:
        handler.find("mychar")
    assert str(lora) in str(info.value) and str(other) in str(info.value)
    assert "apt" not in str(info.value)


def test_lora_hashes_without_kohya_metadata_are_computed_as_a1111_does(tmp_path):
    """A1111 extensions-builtin/Lora/network.py (NetworkOnDisk.__init__/read_hash): the hash is
    ``sshs_model_hash`` from the metadata, else the addnet hash (sha256 of the bytes after the
    header) for a .safetensors file and the whole file's sha256 otherwise; the infotext shows its
    first 12 hex digits. extra_networks_lora.py: the prompt name loses ':' and ',' and each name is
    listed once."""
    import hashlib

    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    source = fresh_bundle("sd1")
    state = random_network(source, seed=3).state_dict()
    plain = lora_dir / "a,b.safetensors"
    save_file(state, str(plain))  # no metadata at all (diffusers / hand-made files)
    torch.save(state, lora_dir / "old.pt")
    data = plain.read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected_st = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    expected_pt = hashlib.sha256((lora_dir / "old.pt").read_bytes()).hexdigest()[:12]
    bundle = fresh_bundle("sd1")
    refs = [
        NetworkRef("lora", "a,b", (0.5,), "<lora:a,b:0.5>"),
        NetworkRef("lora", "old", (0.25,), "<lora:old:0.25>"),
        NetworkRef("lora", "a,b", (0.25,), "<lora:a,b:0.25>"),
    ]
    activation = LoraHandler(lora_dir).activate(bundle, refs, "cat", "")
    try:
        assert activation.info["Lora hashes"] == f"ab: {expected_st}, old: {expected_pt}"
    finally:
        activation.undo()


def test_generate_says_the_unmatched_keys_once_as_a_cli_warning(tmp_path, monkeypatch, python_warnings_shown):
    """Under ``sdcore generate`` the documented :class:`LoraWarning` prints in the CLI's form, once: it printed
    as Python's two-line ``path:line: LoraWarning: ...``, and again through logging."""
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    monkeypatch.delenv("SDCORE_DEBUG", raising=False)
    state = dict(random_network(fresh_bundle("sd1"), conv_rank=0).state_dict())
    state["something_else.weight"] = torch.zeros(3)
    (tmp_path / "loras").mkdir()
    save_file(state, str(tmp_path / "loras" / "extra.safetensors"))
    args = ["generate", "<lora:extra> a cat", "-m", "tiny:sd1", "--steps", "1", "--size", "64x64",
            "--lora-dir", str(tmp_path / "loras"), "-o", str(tmp_path / "o.png")]  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "matched no module" in line]
    assert said == [f"warning: {tmp_path / 'loras' / 'extra.safetensors'}: 1 keys matched no module of the model: "
                    "something_else.weight"], result.output  # fmt: skip
    assert "LoraWarning" not in result.output
