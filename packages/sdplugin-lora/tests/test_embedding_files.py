"""Pivotal-tuning embeddings as separate files: ``--embedding-files`` (OneTrainer's ``bundle_additional_embeddings:
false``: ``<LoRA file>_embeddings/NAME.safetensors`` instead of ``bundle_emb.*`` keys) and ``sdcore lora
extract-embeddings`` (any LoRA's bundle as files; ``--strip``). The files load in sdcore's textual-inversion loader
with exactly the vectors the bundle holds; diffusers' ``load_lora_weights`` refuses a bundle and loads the strip."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sdcore.errors import ConfigError
from sdcore.testing.contract import _bundle, check_resume, contract_options
from sdcore.train.loop import train
from sdplugin_lora.method import LoraMethod, LoraOptions
from sdplugin_ti.embedding import CLIP_G, CLIP_L, SINGLE, T5
from sdplugin_ti.formats import load_embedding

SPEC = "tiny:2:red stripes"  # every caption of the contract dataset starts with "tiny, "


def _train(tmp_path, family="sd1", **overrides):
    values = {"embedding": (SPEC,), "rank": 4, "lr": 1e-2, "embedding_lr": 5e-2, "max_steps": 2, "save_state": False,
              "save_dtype": "fp32", **overrides}  # fmt: skip
    method = LoraMethod(contract_options(LoraMethod, tmp_path, values, family=family))
    return method, train(method, bundle=_bundle(family))


def _cli(*args):
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return CliRunner().invoke(build_cli(get_plugin_manager()), [str(a) for a in args])


@pytest.mark.parametrize(
    ("family", "keys"),
    [
        ("sd1", ("emb_params",)),
        ("sdxl", ("clip_g", "clip_l")),
        ("flux", ("clip_l", "t5", "t5xxl")),  # T5's vectors untrained (no --embedding-t5) and still written
        ("chroma", ("t5", "t5xxl")),  # T5 only, trained
    ],
)
def test_files_hold_exactly_the_bundled_vectors(tmp_path, family, keys):
    """The same run bundled and with --embedding-files: the LoRA file has no bundle_emb key, the embedding file has
    A1111's/ComfyUI's keys, float32, and exactly the vectors the bundled run wrote (and the same LoRA tensors)."""
    _m, bundled = _train(tmp_path / "bundled", family)
    method, files = _train(tmp_path / "files", family, embedding_files=True)
    bundle_state, lora_state = load_file(str(bundled.output)), load_file(str(files.output))
    assert not [k for k in lora_state if k.startswith("bundle_emb")]
    assert sorted(lora_state) == sorted(k for k in bundle_state if not k.startswith("bundle_emb"))
    assert all(torch.equal(lora_state[k], bundle_state[k]) for k in lora_state)
    path = files.output.parent / f"{files.output.name}_embeddings" / "tiny.safetensors"
    assert method.saved_files(files.output) == [files.output, path.parent]
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert sorted(handle.keys()) == list(keys)
        assert all(handle.get_tensor(k).dtype == torch.float32 for k in keys)
    assert (meta["name"], meta["sdcore.family"], meta["step"]) == ("tiny", family, "2")
    emb = load_embedding(path)  # sdcore's textual-inversion loader
    assert emb.name == "tiny" and emb.num_vectors == 2
    if family == "sd1":
        assert list(emb.vectors) == [SINGLE]
        assert torch.equal(emb.vectors[SINGLE], bundle_state["bundle_emb.tiny.clip_l"])
    else:
        parts = sorted({key if key != "t5xxl" else T5 for key in keys})
        assert sorted(emb.vectors) == parts
        for key in parts:
            assert torch.equal(emb.vectors[key], bundle_state[f"bundle_emb.tiny.{key}"].float())


def test_load_result_reads_the_files_back(tmp_path):
    """save -> load_result with --embedding-files: the vectors come from the files beside the LoRA (a missing file
    is a clear mismatch, the bundle left clean)."""
    from sdcore.errors import NetworkMismatchError

    method, result = _train(tmp_path, embedding_files=True)
    loader, fresh = LoraMethod(method.options), _bundle("sd1")
    loader.load_result(fresh, result.output)
    saved = load_file(str(result.output.parent / f"{result.output.name}_embeddings" / "tiny.safetensors"))
    assert torch.equal(loader.pivotal.rows["tiny"].tables[0].detach(), saved["emb_params"])
    assert torch.equal(loader.pivotal.rows["tiny"].tables[0].detach(), method.pivotal.rows["tiny"].tables[0].detach())
    loader.pivotal.remove()
    (result.output.parent / f"{result.output.name}_embeddings" / "tiny.safetensors").unlink()
    vocab = len(fresh.tokenizers[0])
    with pytest.raises(NetworkMismatchError, match=r"tiny\.safetensors: no such file \(--embedding tiny:2:red"):
        LoraMethod(method.options).load_result(fresh, result.output)
    assert len(fresh.tokenizers[0]) == vocab


def test_resume_interrupt_and_save_limit_keep_the_files_with_their_lora(tmp_path):
    """The contract's resume check with --embedding-files: the Ctrl-C's weights are the LoRA and its folder, the
    same tensors as --save-every's; --save-limit 1 after the resume deletes that folder with its LoRA."""
    check_resume(LoraMethod, tmp_path, {"embedding": (SPEC,), "rank": 4, "embedding_files": True}, steps=4)
    kept = sorted(p.relative_to(tmp_path / "parts").as_posix() for p in (tmp_path / "parts").rglob("*tiny.safetensors"))
    assert kept == ["result-step00000003.safetensors_embeddings/tiny.safetensors",
                    "result.safetensors_embeddings/tiny.safetensors"]  # fmt: skip


def test_options_checks(tmp_path):
    with pytest.raises(ConfigError, match="--embedding-files writes the --embedding vectors; this run trains none"):
        LoraMethod(contract_options(LoraMethod, tmp_path, {"embedding_files": True})).validate()
    options = contract_options(LoraMethod, tmp_path, {"embedding": ("a b", "a_b"), "embedding_files": True})
    with pytest.raises(ConfigError, match=r"--embedding 'a b' and 'a_b' would both be written as a_b\.safetensors"):
        LoraMethod(options).validate()
    options = contract_options(LoraMethod, tmp_path, {"embedding": ("<>",), "embedding_files": True})
    with pytest.raises(ConfigError, match="--embedding-files: embedding '<>': no letter or digit"):
        LoraMethod(options).validate()
    options = contract_options(LoraMethod, tmp_path, {"embedding": ("nul",), "embedding_files": True})
    with pytest.raises(ConfigError, match=r"--embedding-files: embedding 'nul': .* a device name Windows reserves"):
        LoraMethod(options).validate()
    LoraMethod(contract_options(LoraMethod, tmp_path, {"embedding": ("<>",)})).validate()  # bundled: any name


def test_onetrainer_bundle_false_writes_files(tmp_path):
    from sdcore.train.config import load_options

    config = {"training_method": "LORA", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
              "resolution": "64", "learning_rate": 1e-4, "bundle_additional_embeddings": False,
              "additional_embeddings": [{"placeholder": "<sks>", "token_count": 2}]}  # fmt: skip
    path = tmp_path / "ot.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    options = load_options(LoraOptions, path, notes=[])
    assert options.embedding == ("<sks>:2:*",) and options.embedding_files is True
    path.write_text(json.dumps({**config, "bundle_additional_embeddings": True}), encoding="utf-8")
    assert load_options(LoraOptions, path, notes=[]).embedding_files is False


# --- sdcore lora extract-embeddings -------------------------------------------------------------------------------
def _v(n, width, seed, dtype=torch.float32):
    return (torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.3).to(dtype)


def _onetrainer_style(path):
    """A LoRA as OneTrainer writes one with additional embeddings (bf16): SDXL parts with an output embedding,
    FLUX.1 parts (clip_l + t5), an older SD1 string_to_param, and one LoRA module."""
    bundled = {
        "bundle_emb.<xl char>.clip_l": _v(2, 768, 1, torch.bfloat16),
        "bundle_emb.<xl char>.clip_g": _v(2, 1280, 2, torch.bfloat16),
        "bundle_emb.<xl char>.clip_l_out": _v(1, 768, 3, torch.bfloat16),
        "bundle_emb.fluxword.clip_l": _v(3, 768, 4, torch.bfloat16),
        "bundle_emb.fluxword.t5": _v(3, 4096, 5, torch.bfloat16),
        "bundle_emb.old.string_to_param.*": _v(1, 768, 6),
    }
    module = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _v(4, 320, 7),
              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _v(320, 4, 8),
              "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}  # fmt: skip
    save_file({**module, **bundled}, str(path), metadata={"ss_network_dim": "4", "sshs_model_hash": "x" * 64,
                                                          "modelspec.hash_sha256": "0x" + "y" * 64})  # fmt: skip
    return bundled, module


def test_extract_embeddings_writes_each_as_its_file(tmp_path):
    bundled, _module = _onetrainer_style(tmp_path / "ot.safetensors")
    out = tmp_path / "embeddings"
    run = _cli("lora", "extract-embeddings", tmp_path / "ot.safetensors", "-o", out)
    assert run.exit_code == 0, run.output
    assert sorted(p.name for p in out.iterdir()) == ["fluxword.safetensors", "old.safetensors", "xl_char.safetensors"]
    assert f"wrote {out / 'xl_char.safetensors'}: '<xl char>', 2 vectors" in run.output
    assert "prompt word 'xl_char'" in run.output and "prompt word 'old'" not in run.output
    files = {name: load_file(str(out / f"{name}.safetensors")) for name in ("xl_char", "fluxword", "old")}
    assert {k: (tuple(t.shape), t.dtype) for k, t in files["xl_char"].items()} == {
        "clip_l": ((2, 768), torch.float32), "clip_g": ((2, 1280), torch.float32),
        "clip_l_out": ((1, 768), torch.float32)}  # fmt: skip
    assert sorted(files["fluxword"]) == ["clip_l", "t5", "t5xxl"] and sorted(files["old"]) == ["emb_params"]
    xl, flux, old = (load_embedding(out / f"{n}.safetensors") for n in ("xl_char", "fluxword", "old"))
    assert torch.equal(xl.vectors[CLIP_L], bundled["bundle_emb.<xl char>.clip_l"].float())  # bf16 -> fp32: exact
    assert torch.equal(xl.vectors[CLIP_G], bundled["bundle_emb.<xl char>.clip_g"].float())
    assert list(xl.output_vectors) == [CLIP_L] and not flux.output_vectors and not old.output_vectors
    assert torch.equal(xl.output_vectors[CLIP_L], bundled["bundle_emb.<xl char>.clip_l_out"].float())
    assert torch.equal(flux.vectors[T5], bundled["bundle_emb.fluxword.t5"].float())
    assert torch.equal(flux.vectors[CLIP_L], bundled["bundle_emb.fluxword.clip_l"].float())
    assert torch.equal(old.vectors[SINGLE], bundled["bundle_emb.old.string_to_param.*"])
    assert flux.family_hint == "FLUX.1"
    with safe_open(str(out / "xl_char.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"name": "<xl char>", "sdcore.source": "ot.safetensors"}

    again = _cli("lora", "extract-embeddings", tmp_path / "ot.safetensors", "-o", out)
    assert again.exit_code == 1 and "already exist; pass --overwrite to replace them" in again.output
    assert _cli("lora", "extract-embeddings", tmp_path / "ot.safetensors", "-o", out, "--overwrite").exit_code == 0

    default = _cli("lora", "extract-embeddings", tmp_path / "ot.safetensors")  # OneTrainer's folder beside it
    assert default.exit_code == 0, default.output
    assert (tmp_path / "ot.safetensors_embeddings" / "old.safetensors").is_file()


@pytest.mark.parametrize(
    ("family", "parts", "keys"),
    [
        ("sd1", {"clip_l": 768}, ["emp_params", "emp_params_out"]),
        ("sdxl", {"clip_l": 768, "clip_g": 1280}, ["clip_g", "clip_g_out", "clip_l", "clip_l_out"]),
        ("flux", {"clip_l": 768, "t5": 4096}, ["clip_l", "clip_l_out", "t5", "t5_out", "t5xxl"]),
    ],
)
def test_extract_embeddings_keeps_onetrainer_output_embeddings(tmp_path, family, parts, keys):
    """An output embedding bundled as OneTrainer bundles it (``modules/modelSaver/*LoRASaver.py``: zero input vectors
    ``bundle_emb.NAME.<part>`` beside the trained ``<part>_out``) is extracted in the layout OneTrainer's own embedding
    files have (``*EmbeddingSaver.py``: SD1's ``emp_params``/``emp_params_out``, else ``<part>``/``<part>_out``), and
    sdcore reads back the same input and output vectors from the file as from the LoRA's bundle."""
    from sdplugin_lora.format import read_lora
    from sdplugin_ti.formats import embedding_from_bundled

    bundled = {}
    for i, (part, width) in enumerate(parts.items()):
        bundled[f"bundle_emb.<ot out>.{part}"] = torch.zeros(2, width, dtype=torch.bfloat16)
        bundled[f"bundle_emb.<ot out>.{part}_out"] = _v(2, width, 10 + i, torch.bfloat16)
    lora = tmp_path / "ot.safetensors"
    save_file({**bundled, "lora_unet_x.lora_down.weight": _v(4, 8, 1), "lora_unet_x.lora_up.weight": _v(8, 4, 2)},
              str(lora))  # fmt: skip
    run = _cli("lora", "extract-embeddings", lora, "-o", tmp_path / "out")
    assert run.exit_code == 0, run.output
    path = tmp_path / "out" / "ot_out.safetensors"
    written = load_file(str(path))
    assert sorted(written) == keys and {t.dtype for t in written.values()} == {torch.float32}
    from_file = load_embedding(path)
    from_bundle = embedding_from_bundled(read_lora(lora).bundled[0])
    if family == "sd1":  # the one tensor: sdcore's TI handler maps OneTrainer's SD1 clip_l/clip_l_out to it
        from_bundle.vectors = {SINGLE: from_bundle.vectors[CLIP_L]}
        from_bundle.output_vectors = {SINGLE: from_bundle.output_vectors[CLIP_L]}
    expected = {SINGLE: "clip_l"} if family == "sd1" else {part: part for part in parts}
    assert sorted(from_file.output_vectors) == sorted(expected) == sorted(from_bundle.output_vectors)
    for key, part in expected.items():
        want = bundled[f"bundle_emb.<ot out>.{part}_out"].float()
        assert float(want.abs().max()) > 0
        assert torch.equal(from_file.output_vectors[key], want)
        assert torch.equal(from_bundle.output_vectors[key].float(), want)
        assert torch.equal(from_file.vectors[key], torch.zeros_like(want))
        assert torch.equal(from_bundle.vectors[key].float(), from_file.vectors[key])
    assert from_file.num_vectors == 2


def test_extract_embeddings_refuses_a_lora_without_any(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": _v(4, 8, 1), "lora_unet_x.lora_up.weight": _v(8, 4, 2)},
              str(tmp_path / "plain.safetensors"))  # fmt: skip
    run = _cli("lora", "extract-embeddings", tmp_path / "plain.safetensors", "-o", tmp_path / "out")
    assert run.exit_code == 1, run.output
    assert "plain.safetensors: no bundled embeddings (no bundle_emb.* keys) to extract" in run.output
    assert "Traceback" not in run.output and not (tmp_path / "out").exists()
    save_file({"bundle_emb.h.llama": _v(1, 8, 1)}, str(tmp_path / "hidream.safetensors"))
    run = _cli("lora", "extract-embeddings", tmp_path / "hidream.safetensors", "-o", tmp_path / "out")
    assert run.exit_code == 1 and "'h' has a 'llama' part" in run.output and not (tmp_path / "out").exists()


def test_strip_writes_the_lora_without_the_bundle(tmp_path):
    from sdcore.models.hashes import autov3_hash, sshs_hashes

    stripped_path = tmp_path / "plain.safetensors"
    bundled, module = _onetrainer_style(tmp_path / "ot.safetensors")
    run = _cli("lora", "extract-embeddings", tmp_path / "ot.safetensors", "-o", tmp_path / "e",
               "--strip", tmp_path / "plain.safetensors")  # fmt: skip
    assert run.exit_code == 0, run.output
    assert f"without its {len(bundled)} bundle_emb tensors" in run.output
    stripped = load_file(str(tmp_path / "plain.safetensors"))
    assert sorted(stripped) == sorted(module) and all(torch.equal(stripped[k], module[k]) for k in module)
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "4"
    assert meta["sshs_model_hash"] == sshs_hashes(module, {"ss_network_dim": "4"})[0] == autov3_hash(stripped_path)
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]  # the source's would be stale


def test_diffusers_refuses_bundled_embeddings_and_loads_the_strip(tmp_path):
    """Real diffusers (``load_lora_weights``): a LoRA trained with --embedding (bundled) is refused as a whole;
    the same run with --embedding-files, and the bundled file after ``--strip``, load and change the UNet."""
    from diffusers import StableDiffusionPipeline
    from lora_testutil import all_params, fresh_bundle

    _m, bundled = _train(tmp_path / "bundled")
    _m, files = _train(tmp_path / "files", embedding_files=True)
    assert _cli("lora", "extract-embeddings", bundled.output, "--strip", tmp_path / "strip.safetensors").exit_code == 0

    def load(path):
        bundle = fresh_bundle("sd1")
        before = all_params(bundle)
        pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                       tokenizer=bundle.tokenizers[0], unet=bundle.unet,
                                       scheduler=bundle.noise_scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
        after = all_params(bundle)
        return {key for key in before if not torch.equal(before[key], after[key])}

    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        load(bundled.output)
    changed = load(files.output)
    assert changed and all(component == "unet" for component, _ in changed)
    assert load(tmp_path / "strip.safetensors") == changed

    # the SD1 embedding file in diffusers' load_textual_inversion (a one-key file: token= names the word, which must
    # be new to the tokenizer): its two rows are the trained vectors, the prompt word becomes both tokens
    bundle = fresh_bundle("sd1")
    pipe = StableDiffusionPipeline(vae=bundle.vae, text_encoder=bundle.text_encoders[0],
                                   tokenizer=bundle.tokenizers[0], unet=bundle.unet, scheduler=bundle.noise_scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    path = files.output.parent / f"{files.output.name}_embeddings" / "tiny.safetensors"
    pipe.load_textual_inversion(str(path), token="<tiny>")
    prompt = pipe.maybe_convert_prompt("a photo of <tiny>", pipe.tokenizer)
    assert prompt == "a photo of <tiny> <tiny>_1"
    ids = pipe.tokenizer(prompt).input_ids[4:6]
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[ids]
    assert torch.equal(rows, load_file(str(bundled.output))["bundle_emb.tiny.clip_l"])


def test_interrupted_resave_never_pairs_the_old_lora_with_new_vectors(tmp_path, monkeypatch):
    """The same path saved again (a resumed run's step, a rerun into one --output) with a Ctrl-C after the embedding
    files and before the LoRA: the old LoRA is gone rather than left beside vectors of another step."""
    import sdplugin_lora.format as lora_format
    from sdcore.train.method import SaveInfo

    method, result = _train(tmp_path, embedding_files=True)
    folder = result.output.parent / f"{result.output.name}_embeddings"
    with torch.no_grad():
        method.pivotal.rows["tiny"].tables[0].add_(1.0)  # the vectors of a later step

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_format, "save_lora", interrupted)
    info = SaveInfo(path=result.output, step=3, epoch=1, metadata={}, final=True)
    with pytest.raises(KeyboardInterrupt):
        method.save(_bundle("sd1"), info)
    assert not result.output.exists()
    assert torch.equal(load_file(str(folder / "tiny.safetensors"))["emb_params"], method.pivotal.rows["tiny"].tables[0])


def test_file_vectors_keep_the_key_of_a_one_encoder_family_other_than_clip_l():
    """Only SD1/SD2's CLIP-L tensor becomes the one-tensor ``emb_params`` file; a family whose one encoder is T5
    (Chroma, once pivotal tuning covers it) keeps ``t5``, which ComfyUI and OneTrainer look up by name."""
    from types import SimpleNamespace

    from sdplugin_lora.pivotal import EmbeddingSpec, PivotalEmbeddings

    pivotal = PivotalEmbeddings([EmbeddingSpec("x", 1, "*")])
    table = _v(1, 16, 1)
    pivotal.rows = {"x": SimpleNamespace(tables={0: table})}  # type: ignore[dict-item]
    pivotal.keys = ("clip_l",)
    assert list(pivotal.file_vectors()["x"]) == [SINGLE]
    pivotal.keys = ("t5",)
    assert list(pivotal.file_vectors()["x"]) == [T5]
    pivotal.rows = {"x": SimpleNamespace(tables={0: table, 1: _v(1, 32, 2)})}  # type: ignore[dict-item]
    pivotal.keys = ("clip_l", "t5")
    assert sorted(pivotal.file_vectors()["x"]) == [CLIP_L, T5]


def test_strip_of_a_pickle_lora_is_refused_before_any_file(tmp_path):
    torch.save({"bundle_emb.a.string_to_param.*": _v(1, 768, 1), "lora_unet_x.lora_down.weight": _v(4, 8, 2),
                "lora_unet_x.lora_up.weight": _v(8, 4, 3)}, tmp_path / "old.pt")  # fmt: skip
    run = _cli("lora", "extract-embeddings", tmp_path / "old.pt", "-o", tmp_path / "out",
               "--strip", tmp_path / "plain.safetensors")  # fmt: skip
    assert run.exit_code == 1 and "--strip: " in run.output and "is no .safetensors file" in run.output, run.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "plain.safetensors").exists()
    run = _cli("lora", "extract-embeddings", tmp_path / "old.pt", "-o", tmp_path / "out")
    assert run.exit_code == 0, run.output
    assert torch.equal(load_embedding(tmp_path / "out" / "a.safetensors").vectors[SINGLE], _v(1, 768, 1))


def test_a_strip_not_named_safetensors_is_refused_before_any_file_is_written(tmp_path):
    """``-o`` of every LoRA tool refuses a name A1111 and ComfyUI would read as a pickle (or not list); ``--strip``
    writes a LoRA too, and ``--strip plain.pt`` wrote safetensors bytes under a pickle name."""
    _onetrainer_style(tmp_path / "ot.safetensors")
    for name, fixed in (("plain.pt", "plain"), ("plain", "plain")):
        run = _cli("lora", "extract-embeddings", tmp_path / "ot.safetensors", "-o", tmp_path / "e",
                   "--strip", tmp_path / name)  # fmt: skip
        assert run.exit_code == 1, run.output
        assert f"--strip {tmp_path / name}: sdcore writes LoRA files as .safetensors" in run.output, run.output
        assert f"use --strip {tmp_path / fixed}.safetensors" in run.output
        assert not (tmp_path / name).exists() and not (tmp_path / "e").exists()
