"""TI training: the runtime contract (learning, save/load, resume) plus TI specifics."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from sdcore.errors import ConfigError
from sdcore.testing.contract import MethodContractTests, check_one_step, contract_options
from sdcore.testing.toyworld.concepts import KNOWN_COMPOSITION
from sdplugin_ti.formats import load_embedding
from sdplugin_ti.method import TIMethod, TIOptions

# the contract's dataset captions start with "tiny": naming the embedding so puts it in every prompt
TI_OPTIONS = {"name": "tiny", "vectors": 2, "template": "subject_filewords", "lr": 5e-2}


class TestTIContract(MethodContractTests):
    """The shared contract. On the plain random tiny UNet text conditioning moves the denoising loss
    by under 1% (a TI only changes the cross-attention input), so the learning check runs the
    contract's own ``check_learning`` on a tiny UNet whose cross-attention output is amplified."""

    method_class = TIMethod
    options = TI_OPTIONS
    # The toy-world check: one new word for a composition toyworld: already draws (a large red
    # circle); TI cannot teach a new object, it finds where a known one lives. The template is the
    # bare name, the prompt sampled. Measured on 8 samples, training seeds 1234 / 1 / 2:
    # 0.00 -> 0.62 / 1.00 / 1.00 (lr 0.1: 0.25 for seed 1234, too high). About 20-35 s on a shared
    # 2-core CPU. The margin is the lowest seed's score less one sample.
    toyworld_concept = KNOWN_COMPOSITION
    toyworld_margin = 0.5
    toyworld_steps = 150
    toyworld_options = {
        "name": "sks",
        "template": str(Path(__file__).parent / "data" / "name_only.txt"),
        "vectors": 2,
        "lr": 5e-2,
    }

    def test_contract_learning(self, tmp_path, monkeypatch):
        import sdcore.testing.contract as contract

        plain = contract._bundle
        monkeypatch.setattr(contract, "_bundle", lambda family: _amplify_cross_attention(plain(family)))
        contract.check_learning(TIMethod, tmp_path, TI_OPTIONS, steps=30, min_drop=0.04)


def _amplify_cross_attention(bundle, gain: float = 20.0):
    with torch.no_grad():
        for name, module in bundle.unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(gain)
    return bundle


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_learns_when_conditioning_matters(tmp_path, make_bundle, family):
    """With the cross-attention output amplified, the fixed-noise loss falls clearly (> 4%) and
    nothing but the embedding tables changes."""
    from sdcore.train.loop import TrainSession

    values = {**TI_OPTIONS, "max_steps": 30, "batch_size": 4, "save_state": False}
    options = contract_options(TIMethod, tmp_path, values, family=family, tag="learn")
    bundle = _amplify_cross_attention(make_bundle(family))
    unet_before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    te_before = [{k: v.clone() for k, v in te.state_dict().items()} for te in bundle.text_encoders]
    session = TrainSession(TIMethod(options), bundle=bundle)
    session.setup()
    before = session.fixed_loss()
    session.run()
    after = session.fixed_loss()
    assert after < before * 0.96, (before, after)
    assert all(torch.equal(v, bundle.unet.state_dict()[k]) for k, v in unet_before.items())
    for te, saved in zip(bundle.text_encoders, te_before, strict=False):
        assert all(torch.equal(v, te.state_dict()[k]) for k, v in saved.items())


def test_save_limit_deletes_the_format_copy_with_the_pt_across_a_resume(tmp_path):
    """--format safetensors writes each save twice (the A1111 .pt and the copy): saved_files names both, so the
    contract's Ctrl-C + --save-limit 1 + resume leaves neither of the interrupted step's files behind."""
    from sdcore.testing.contract import check_resume

    check_resume(TIMethod, tmp_path, {**TI_OPTIONS, "format": "safetensors"})
    left = sorted(p.name for p in (tmp_path / "parts" / "embeddings").iterdir())
    assert left == ["tiny-3.pt", "tiny-3.safetensors"]


def test_sdxl_one_step_writes_clip_l_and_clip_g(tmp_path):
    result = check_one_step(TIMethod, tmp_path, {**TI_OPTIONS, "format": "safetensors"}, family="sdxl")
    emb = load_embedding(result.output)
    assert emb.widths == {"clip_l": 32, "clip_g": 64} and emb.num_vectors == 2
    st = load_embedding(result.output.with_suffix(".safetensors"))
    assert torch.equal(st.vectors["clip_g"], emb.vectors["clip_g"]) and st.step == 1


def test_sd2_intermediate_embeddings_and_extra_format(tmp_path, make_bundle):
    from sdcore.train.loop import train

    options = contract_options(
        TIMethod, tmp_path, {**TI_OPTIONS, "max_steps": 2, "save_every": 1, "format": "bin"}, family="sd2"
    )
    result = train(TIMethod(options), bundle=make_bundle("sd2"))
    folder = result.output.parent
    assert result.output.name == "result.pt"
    raw = torch.load(result.output, weights_only=True)
    assert raw["name"] == "tiny" and raw["step"] == 2 and raw["string_to_param"]["*"].shape == (2, 32)
    first = load_embedding(folder / "embeddings" / "tiny-1.pt")
    assert first.step == 1 and not torch.equal(first.vectors["*"], load_embedding(result.output).vectors["*"])
    assert torch.equal(load_embedding(folder / "result.bin").vectors["*"], raw["string_to_param"]["*"])


def test_only_embedding_rows_train(tmp_path, make_bundle):
    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, "init_text": "red cat"})
    method = TIMethod(options)
    bundle = make_bundle("sd1")
    before = {k: v.clone() for k, v in bundle.text_encoders[0].state_dict().items()}
    groups = method.prepare(bundle)
    params = groups[0]["params"]
    assert len(params) == 1 and params[0].shape == (2, 32) and params[0].requires_grad
    assert groups[0]["weight_decay"] == 0.0
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    assert not any(p.requires_grad for p in bundle.text_encoders[0].parameters())
    # A1111 init: "red cat" -> two token rows spread over two vectors
    ids = bundle.tokenizers[0]("red cat", add_special_tokens=False).input_ids
    weight = bundle.text_encoders[0].get_input_embeddings().weight
    torch.testing.assert_close(params[0].detach(), weight[ids].detach())
    opt = torch.optim.AdamW(params, lr=0.1)
    cond = method.encode(bundle, [method.caption_for("a dog", is_class=False, rng=random.Random(0))])
    cond.hidden_states.pow(2).mean().backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    opt.step()
    after = bundle.text_encoders[0].state_dict()
    assert before.keys() == after.keys()  # the tables are not part of the model's state
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_caption_templates_and_placeholders(tmp_path, make_bundle):
    template = tmp_path / "t.txt"
    template.write_text("art of [filewords] by [name]\n", encoding="utf-8")
    options = contract_options(TIMethod, tmp_path, {"name": "Zork", "vectors": 3, "template": str(template)})
    method = TIMethod(options)
    method.prepare(make_bundle("sd1"))
    assert method.caption_for("a hill", is_class=False, rng=random.Random(1)) == "art of a hill by Zork"
    assert method.caption_for("class photo", is_class=True, rng=random.Random(1)) == "class photo"
    assert method.expand_prompt("art by Zork") == "art by zork zork__ti1 zork__ti2"


def test_a_placeholder_stands_for_the_embedding_where_it_is_written(tmp_path, make_bundle):
    """--placeholder (OneTrainer's ``<embedding>``): OneTrainer replaces the placeholder text wherever it occurs in
    a prompt by the embedding's tokens (``BaseModel._add_embeddings_to_prompt``: ``str.replace``), captions and
    samples alike; ``[name]`` of a template writes the placeholder; the name only names the file."""
    template = tmp_path / "t.txt"
    template.write_text("[filewords] by [name]\n", encoding="utf-8")
    options = {"name": "model", "placeholder": "<embedding>", "vectors": 2, "template": str(template)}
    method = TIMethod(contract_options(TIMethod, tmp_path, options))
    method.prepare(make_bundle("sd1"))
    tokens = "model__ti0 model__ti1"  # "model" is a word of CLIP's vocabulary: its tokens are distinct
    assert method.caption_for("a <embedding>", is_class=False, rng=random.Random(1)) == "a <embedding> by <embedding>"
    assert method.expand_prompt("a <embedding>, a model") == f"a {tokens}, a model"  # the name is not the word
    assert method.expand_prompt("x<embedding>y") == f"x {tokens} y"  # anywhere, as str.replace; kept apart
    assert method.expand_prompt("a <EMBEDDING>") == "a <EMBEDDING>"  # case-sensitive, as str.replace
    with pytest.raises(ConfigError, match="--placeholder is blank"):
        TIMethod(contract_options(TIMethod, tmp_path, {**options, "placeholder": "  "})).validate()


def test_a_placeholder_in_the_captions_passes_the_filewords_check(tmp_path):
    caption = "photo of a <embedding> on a hill"
    assert _preflight_problems(tmp_path, [caption], template="filewords", name="out", placeholder="<embedding>") == []
    problems = _preflight_problems(tmp_path, ["a hill"], template="filewords", name="out", placeholder="<embedding>")
    assert len(problems) == 1 and "contains '<embedding>'" in problems[0]
    assert "write <embedding> in the captions" in problems[0]


def test_lr_schedule_lambda(tmp_path):
    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, "lr": 5e-3, "lr_schedule": "0.005:10, 1e-3:20, 1e-4"})
    method = TIMethod(options)
    method.validate()
    factor = method.lr_lambda()
    assert [round(factor(s) * 5e-3, 12) for s in (0, 9, 10, 19, 20, 999)] == [0.005, 0.005, 1e-3, 1e-3, 1e-4, 1e-4]
    assert TIMethod(contract_options(TIMethod, tmp_path, TI_OPTIONS)).lr_lambda() is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": ""}, "--name is required"),
        ({"name": "a/b"}, "letters, digits"),
        ({"vectors": 0}, "between 1 and 75"),
        ({"lr_schedule": "0.1:10, 0.2:5"}, "greater than"),
        ({"template": "/nope.txt"}, "no such file"),
        ({"latent_sampling": "random"}, "--no-cache-latents"),
        ({"latent_sampling": "deterministic"}, "not supported"),
        # no silent <folder>/<name>.pt for a .safetensors output: the .pt and its --format copy
        ({"output": "x.safetensors"}, r"^--output x.safetensors: .* give --output x.pt --format safetensors$"),
        ({"output": "out/x.ckpt"}, r"give --output out/x.pt$"),
    ],
)
def test_validation(tmp_path, overrides, message):
    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, **overrides})
    with pytest.raises(ConfigError, match=message):
        TIMethod(options).validate()


def test_defaults_and_registration():
    from sdplugin_ti import plugin

    assert TIOptions().lr == 5e-3 and TIOptions().init_text == "*" and TIOptions().vectors == 1
    methods, networks = [], []
    plugin.sdcore_register_methods(methods.append)
    plugin.sdcore_register_prompt_networks(networks.append)
    assert methods[0].name == "ti" and methods[0].load() is TIMethod
    spec = networks[0]
    assert spec.tag is None and spec.directory_option == "embeddings_dir" and spec.default_subdir == "embeddings"
    from sdplugin_ti.apply import EmbeddingHandler

    assert spec.load() is EmbeddingHandler


def test_lr_schedule_is_applied_in_training(tmp_path, make_bundle):
    """'0.05:1, 1e-12': only the first update moves the vectors, whatever the runtime's scheduler does."""
    from sdcore.train.loop import train

    def run(tag, schedule):
        values = {**TI_OPTIONS, "max_steps": 3, "save_every": 1, "lr": 0.05, "lr_schedule": schedule}
        options = contract_options(TIMethod, tmp_path / tag, values)
        result = train(TIMethod(options), bundle=make_bundle("sd1"))
        first = load_embedding(result.output.parent / "embeddings" / "tiny-1.pt").vectors["*"]
        return first, load_embedding(result.output).vectors["*"]

    first, last = run("scheduled", "0.05:1, 1e-12")
    assert (last - first).abs().max() < 1e-9
    first, last = run("constant", "")
    assert (last - first).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [{"gradient_checkpointing": True}, {"mixed_precision": "bf16"}])
def test_trains_with_checkpointing_and_bf16(tmp_path, make_bundle, extra):
    from sdcore.train.loop import train

    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, "max_steps": 2, "init_text": "red", **extra})
    method = TIMethod(options)
    bundle = make_bundle("sd1")
    result = train(method, bundle=bundle)
    ids = bundle.tokenizers[0]("red", add_special_tokens=False).input_ids
    init = bundle.text_encoders[0].get_input_embeddings().weight[ids[0]].float().cpu()
    trained = load_embedding(result.output).vectors["*"]
    assert torch.isfinite(trained).all()
    assert (trained - init).abs().max() > 1e-3  # gradients reached the embedding


def test_output_folder_gets_name_pt(tmp_path):
    method = TIMethod(contract_options(TIMethod, tmp_path, TI_OPTIONS))
    assert method.resolve_output(tmp_path / "out") == tmp_path / "out" / "tiny.pt"
    assert method.resolve_output(tmp_path / "x.pt") == tmp_path / "x.pt"


def test_safetensors_embedding_holds_kohyas_metadata_options(tmp_path):
    """kohya's --metadata_* options in the .safetensors header (modelspec.*, as train_textual_inversion.py
    writes them); the A1111 .pt has no header to hold them."""
    from safetensors import safe_open

    meta = {"metadata_title": "Tiny Style", "metadata_author": "me", "metadata_tags": "style, tiny"}
    result = check_one_step(TIMethod, tmp_path, {**TI_OPTIONS, "format": "safetensors", **meta})
    with safe_open(str(result.output.with_suffix(".safetensors")), framework="pt") as handle:
        header = handle.metadata()
    assert header["modelspec.title"] == "Tiny Style" and header["modelspec.author"] == "me"
    assert header["modelspec.tags"] == "style, tiny"
    assert header["name"] == "tiny"  # the embedding's own keys stay
    # kohya's TI ModelSpec set (sai_model_spec.build_metadata, textual_inversion=True) around them
    assert header["modelspec.sai_model_spec"] == "1.0.1"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert header["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert header["modelspec.resolution"] == "64x64" and header["modelspec.prediction_type"] == "epsilon"
    assert "modelspec.author" not in _safetensors_header(check_one_step(TIMethod, tmp_path / "plain", {
        **TI_OPTIONS, "format": "safetensors"}).output)  # fmt: skip


def _safetensors_header(pt_path):
    from safetensors import safe_open

    with safe_open(str(pt_path.with_suffix(".safetensors")), framework="pt") as handle:
        return handle.metadata()


def test_sdxl_embedding_modelspec_title_and_architecture(tmp_path):
    result = check_one_step(TIMethod, tmp_path, {**TI_OPTIONS, "format": "safetensors"}, family="sdxl")
    header = _safetensors_header(result.output)
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    assert header["modelspec.title"] == result.output.stem == "result"  # the file name (kohya: output_name)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_preflight_result_size_is_the_files_a_save_writes(tmp_path, fmt):
    """The pre-flight's disk estimate of a result is the .pt and the --format extra one save writes (within
    10 %): the vectors alone at --save-dtype said 256 bytes ("about 0 KiB") for about 2 KiB of files."""
    from sdcore.train.preflight import run_preflight

    overrides = {**TI_OPTIONS, "format": fmt}
    options = contract_options(TIMethod, tmp_path / "plan", {**overrides, "max_steps": 1})
    disk = run_preflight(TIMethod(options), options).disk
    output = Path(check_one_step(TIMethod, tmp_path / "run", overrides).output)
    written = {output, output.with_suffix(f".{fmt}")}
    assert disk is not None
    assert disk.result_bytes == pytest.approx(sum(p.stat().st_size for p in written), rel=0.1)
    assert "0 KiB" not in disk.line()


def test_a_template_without_name_needs_the_name_in_the_captions(tmp_path):
    """filewords (OneTrainer's way), none or a file without [name]: the embedding reaches a prompt only through
    the captions; when none holds its name it would never train, and the pre-flight says so before loading."""
    from sdcore.train.preflight import run_preflight

    def problems(**overrides):
        options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, **overrides})
        return run_preflight(TIMethod(options), options, plan=False).problems

    n = len(list(Path(contract_options(TIMethod, tmp_path, TI_OPTIONS).data).rglob("*.txt")))
    assert problems(template="filewords") == []  # the captions start with "tiny", the name (any case, whole word)
    assert problems(template="filewords", name="TINY") == []
    assert problems(template="subject", name="zork") == []  # the template says [name]
    assert problems(template="filewords", name="zork") == [
        f"--template filewords: no line has [name], and no caption of the {n} training images contains 'zork': the "
        "embedding would never be in a training prompt (write zork in the captions, or choose a template with [name])"
    ]
    assert problems(template="filewords", name="tin") != []  # a whole word, not a part of one
    assert problems(template="filewords", name="zork", caption_prefix="zork,") == []  # the prefix is written too
    assert problems(template="none")[0].startswith("--template none: no line has [name] or [filewords] (the captions)")


def _preflight_problems(tmp_path, captions=None, **overrides):
    """The pre-flight's problems for a TI run on the contract's dataset, its captions replaced by ``captions``
    (one per image, in file order; ``None`` deletes the caption file)."""
    from sdcore.train.preflight import run_preflight

    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, **overrides})
    if captions is not None:
        files = sorted(Path(options.data).rglob("*.txt"))
        for path, text in zip(files, captions * len(files), strict=False):
            if text is None:
                path.unlink()
            else:
                path.write_text(text, encoding="utf-8")
    return run_preflight(TIMethod(options), options, plan=False).problems


@pytest.mark.parametrize(
    ("name", "caption"),
    [
        ("my-emb", "my-emb, red stripes"),  # punctuation inside the name: the whole name is matched
        ("emb_v2", "a photo of emb_v2"),
        ("zork", "<zork>, red stripes"),  # inside <...>: '<' and '>' are not word characters
        ("zork", "{zork|a zork} with red stripes"),  # a wildcard variant
        ("zork", "a photo of [name]"),  # A1111 fills [name] after [filewords] (create_text's order)
        ("my emb", "a My Emb drawing"),  # a name of two words, any case
    ],
)
def test_filewords_captions_that_name_the_embedding_are_not_refused(tmp_path, name, caption):
    """Every spelling that expand_prompt turns into the embedding's tokens at training time passes the check."""
    from sdplugin_ti.apply import expand_prompt
    from sdplugin_ti.templates import render

    prompt = render("[filewords]", name, caption)
    assert expand_prompt(prompt, {name: ["tok"]}) != prompt  # training puts the embedding in this prompt
    assert _preflight_problems(tmp_path, [caption], template="filewords", name=name) == []


def test_class_token_captions_and_other_caption_extensions_count(tmp_path):
    """The captions training reads: the folder's class tokens for an image without a caption file (here
    '1_tiny'), and the files of --caption-extension."""
    assert _preflight_problems(tmp_path / "a", [None], template="filewords", name="tiny") == []
    options = contract_options(TIMethod, tmp_path / "b", TI_OPTIONS)
    for path in Path(options.data).rglob("*.txt"):
        path.with_suffix(".caption").write_text("a zork", encoding="utf-8")
    assert _preflight_problems(tmp_path / "b", template="filewords", name="zork", caption_extension=".caption") == []
    assert _preflight_problems(tmp_path / "b", template="filewords", name="zork") != []  # the .txt files say tiny


def test_a_template_line_that_names_the_embedding_itself_is_not_refused(tmp_path):
    """A template file may spell the embedding's name instead of [name]: the line reaches encode() as written and
    the name in it is expanded there (TIMethod.encode -> expand_prompt), so the embedding trains. A1111 does the
    same: its prompt goes through the embedding database, which finds the name's tokens wherever they are
    (A1111 modules/textual_inversion/dataset.py create_text only replaces [filewords]/[name]; the rest of the line
    is kept)."""
    literal = tmp_path / "literal.txt"
    literal.write_text("a photo of Zork\n", encoding="utf-8")
    with_filewords = tmp_path / "by.txt"
    with_filewords.write_text("[filewords], art by zork\n", encoding="utf-8")
    assert _preflight_problems(tmp_path / "a", template=str(literal), name="zork") == []
    assert _preflight_problems(tmp_path / "b", template=str(with_filewords), name="zork") == []
    # a part of a word in the line is not the name (expand_prompt matches whole words only)
    part = tmp_path / "part.txt"
    part.write_text("a photo of zorkish things\n", encoding="utf-8")
    assert _preflight_problems(tmp_path / "c", template=str(part), name="zork") != []


def _imported_problems(tmp_path, config_name, text, captions):
    """Load a kohya/OneTrainer config as `sdcore train ti --config` does, train it on the contract's dataset with
    ``captions``, and return the pre-flight's problems."""
    import dataclasses

    from sdcore.train.config import load_options
    from sdcore.train.preflight import run_preflight

    base = contract_options(TIMethod, tmp_path, TI_OPTIONS)
    for path in sorted(Path(base.data).rglob("*.txt")):
        path.write_text(captions, encoding="utf-8")
    config = tmp_path / config_name
    config.write_text(text, encoding="utf-8")
    loaded = load_options(TIOptions, config, notes=[])
    keep = {"name", "placeholder", "template", "vectors", "init_text"}
    options = dataclasses.replace(base, **{k: getattr(loaded, k) for k in keep})
    return options.template, run_preflight(TIMethod(options), options, plan=False).problems


def test_kohya_ti_configs_are_not_refused(tmp_path):
    """kohya's train_textual_inversion.py: --token_string is the word (-> --name); with --use_object_template /
    --use_style_template its imagenet templates hold it ("{}" -> the tokens, train_textual_inversion.py:339-346),
    sdcore's subject/style with [name], whatever the captions say; without either flag it trains on the captions as
    written, the token string replaced inside them (L353-357): sdcore's filewords, so captions must name it."""
    toml = 'token_string = "zork"\ninit_word = "cat"\nnum_vectors_per_token = 2\n'
    for extra, template in (("use_object_template = true\n", "subject"), ("use_style_template = true\n", "style")):
        assert _imported_problems(tmp_path / template, "ti.toml", toml + extra, "red stripes") == (template, [])
    assert _imported_problems(tmp_path / "named", "ti.toml", toml, "a zork, red stripes") == ("filewords", [])
    template, problems = _imported_problems(tmp_path / "unnamed", "ti.toml", toml, "red stripes")
    assert template == "filewords" and len(problems) == 1 and "zork" in problems[0]
    # a template the config names itself wins (no clash with token_string)
    named = toml + 'template = "subject_filewords"\n'
    assert _imported_problems(tmp_path / "own", "ti.toml", named, "red stripes") == ("subject_filewords", [])


def test_onetrainer_embedding_configs_follow_onetrainer_s_placeholder_rule(tmp_path):
    """OneTrainer puts the embedding into a prompt only by replacing its placeholder in the caption
    (modules/model/BaseModel.py:252 ``prompt.replace(embedding.placeholder, ...)``): captions holding it train, and
    sdcore's import (--placeholder = the placeholder, --name = the output file's stem, --template filewords) is not
    refused for them; captions without it give the embedding no gradient in OneTrainer either, and sdcore says so
    before loading. The presets leave the placeholder at its default, ``<embedding>``."""
    import json

    config = json.dumps(
        {"training_method": "EMBEDDING", "model_type": "STABLE_DIFFUSION_15", "base_model_name": "tiny:sd1",
         "embedding": {"placeholder": "zork", "token_count": 2, "initial_embedding_text": "a cat"}}
    )  # fmt: skip
    assert _imported_problems(tmp_path / "a", "ot.json", config, "a zork, red stripes") == ("filewords", [])
    template, problems = _imported_problems(tmp_path / "b", "ot.json", config, "red stripes")
    assert template == "filewords" and len(problems) == 1 and "contains 'zork'" in problems[0]
    preset = json.dumps({"training_method": "EMBEDDING", "model_type": "STABLE_DIFFUSION_15", "base_model_name":
                         "tiny:sd1", "output_model_destination": "models/my emb.safetensors"})  # fmt: skip
    assert _imported_problems(tmp_path / "c", "ot.json", preset, "a <embedding>, red stripes") == ("filewords", [])
    assert _imported_problems(tmp_path / "d", "ot.json", preset, "a photo<embedding>") == ("filewords", [])


def test_an_existing_embedding_is_not_silently_replaced(tmp_path):
    """A1111 continues training an embedding file that exists; sdcore starts new vectors, so the pre-flight says
    the file will be replaced and how to continue it: --init-weights, and --resume latest only where a saved state
    is (a file copied from A1111 has none). The run's own intermediates (``embeddings/<name>-<step>.pt``) and a
    --resume or --init-weights run say nothing."""
    from sdcore.train.checkpoints import output_paths
    from sdcore.train.preflight import run_preflight

    def notes(**overrides):
        options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, **overrides})
        return [n for n in run_preflight(TIMethod(options), options, plan=False).notes if "exists" in n]

    options = contract_options(TIMethod, tmp_path, TI_OPTIONS)
    existing, state_root = output_paths(TIMethod(options), options)
    intermediate = existing.parent / "embeddings" / f"{existing.stem}-500.pt"
    intermediate.parent.mkdir(parents=True, exist_ok=True)
    intermediate.write_bytes(b"old")
    assert notes() == []
    existing.write_bytes(b"old")
    (note,) = notes()
    assert note.startswith(f"{existing} exists: this run trains a new embedding") and "A1111 would continue" in note
    assert note.endswith(f"to continue, pass --init-weights {existing} (its vectors, a fresh optimizer and step count)")
    (state_root / "step-00000500").mkdir(parents=True)
    (state_root / "step-00000500" / "train_state.json").write_text("{}")
    (note,) = notes()
    assert note.endswith(f"to continue, pass --init-weights {existing} (its vectors, a fresh optimizer and step count)"
                         f", or continue the run that wrote it exactly, from its saved state in {state_root} (see the "
                         "note on that folder)")  # fmt: skip
    options = contract_options(TIMethod, tmp_path, TI_OPTIONS)  # that note gives --resume latest, said once
    every = run_preflight(TIMethod(options), options, plan=False).notes
    assert sum(n.count("--resume latest") for n in every) == 1
    assert any(n.startswith(f"{state_root} holds the resumable state of an earlier run") for n in every)
    assert notes(resume="latest") == [] and notes(init_weights=str(existing)) == []
    output = tmp_path / "mine.pt"  # --output naming the file: that file is the one replaced
    output.write_bytes(b"old")
    (note,) = notes(output=str(output))
    assert note.startswith(f"{output} exists:")
