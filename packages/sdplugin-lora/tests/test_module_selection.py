"""Module selection: ``sdcore lora targets``, ``--layer-exclude``, OneTrainer's layer presets and ai-toolkit's
``only_if_contains`` / ``ignore_if_contains``.

The expectations are written here from the references' rules:
- OneTrainer ``modules/module/LoRAModule.py`` (``LoRAModuleWrapper``: every ``Linear``/``Conv2d`` of the denoiser
  whose name inside it some ``ModuleFilter`` matches) and each ``Base*Setup.LAYER_PRESETS`` (what its UI writes
  into ``layer_filter`` for a preset);
- ai-toolkit ``toolkit/lora_special.py`` (``create_modules``: ``clean_name = "<prefix>.<path>"``, ``lora_name`` =
  that with ``.`` written ``_`` (``lora_unet``) or ``$$`` (PEFT ``transformer``, always on Flux/SD3); a module is
  skipped when an ``ignore_if_contains`` word is in ``clean_name``, and kept by ``only_if_contains`` when a word is
  in ``clean_name`` or in ``lora_name``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from sdplugin_lora.method import LoraMethod, LoraOptions


def _meta(family: str):
    from sdcore.models.layout import meta_bundle, read_layout

    return meta_bundle(read_layout(f"tiny:{family}"))


def _denoiser(bundle):
    return bundle.transformer if bundle.transformer is not None else bundle.unet


def _layers(family: str) -> set[str]:
    """Every Linear and Conv2d of the denoiser: what OneTrainer's LoRAModuleWrapper considers."""
    return {n for n, m in _denoiser(_meta(family)).named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}


def _adapted(method: LoraMethod) -> set[str]:
    """component.path of every layer the prepared network adapts (a fused module: each of its layers)."""
    index = method.index
    by_module = {id(t.module): t for t in index.targets.values()}
    out = set()
    for adapter in method.network:
        for base in getattr(adapter, "bases", None) or (adapter.base,):
            target = by_module[id(base)]
            out.add(f"{target.component}.{target.path}")
    return out


# --- sdcore lora targets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "args", "options"),
    [
        ("sd1", ["--conv-rank", "2", "--train-text-encoder", "--layer-filter", "attn1, resnets.0"],
         dict(conv_rank=2, train_text_encoder=True, layer_filter="attn1, resnets.0")),
        ("sdxl", ["--algo", "loha", "--lycoris-preset", "attn-only", "--layer-exclude", "attn2"],
         dict(algo="loha", lycoris_preset="attn-only", layer_exclude="attn2")),
        ("flux", ["--train-text-encoder", "--layer-filter", "transformer_blocks.0.,single", "--layer-exclude",
                  "proj_mlp"],
         dict(train_text_encoder=True, layer_filter="transformer_blocks.0.,single", layer_exclude="proj_mlp")),
    ],
)  # fmt: skip
def test_targets_command_lists_what_training_adapts_on_a_model_file(tmp_path, family, args, options):
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.models.load import load_model
    from sdcore.plugins import get_plugin_manager

    path = load_model(f"tiny:{family}").save(tmp_path / f"{family}.safetensors")
    result = CliRunner().invoke(
        build_cli(get_plugin_manager()), ["lora", "targets", "--model", str(path), "--json", *args]
    )
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout[result.stdout.index("{") :])
    # what a training run adapts: prepare on the loaded model (weights and all)
    trained = LoraMethod(LoraOptions(**options))
    trained.prepare(load_model(str(path)))
    assert {m["name"] for m in listed["modules"]} == set(trained.network.loras)
    assert {p for m in listed["modules"] for p in m["paths"]} == _adapted(trained)
    per_component: dict[str, int] = {}
    for layer in _adapted(trained):
        per_component[layer.split(".")[0]] = per_component.get(layer.split(".")[0], 0) + 1
    assert listed["counts"] == per_component
    # each pattern's matches: OneTrainer's substring rule on the candidates (the run without filter/exclude)
    plain = {k: v for k, v in options.items() if k not in ("layer_filter", "layer_exclude")}
    unfiltered = LoraMethod(LoraOptions(**plain))
    unfiltered.prepare(_meta(family))
    denoiser = unfiltered.index.denoiser
    candidates = {p.split(".", 1)[1] for p in _adapted(unfiltered) if p.startswith(denoiser + ".")}
    assert listed["candidates"] == len(candidates)
    wanted = [("--layer-filter", p.strip()) for p in options.get("layer_filter", "").split(",") if p.strip()]
    wanted += [("--layer-exclude", p.strip()) for p in options.get("layer_exclude", "").split(",") if p.strip()]
    got = {(m["flag"], m["pattern"]): set(m["matched"]) for m in listed["patterns"]}
    assert got == {key: {c for c in candidates if key[1] in c} for key in wanted}
    assert all(got.values()), "every pattern of these runs matches something"
    # and the adapted denoiser layers are the candidates kept by the filter, less the excluded ones
    keep = [p for flag, p in wanted if flag == "--layer-filter"]
    drop = [p for flag, p in wanted if flag == "--layer-exclude"]
    expected = {c for c in candidates if (not keep or any(p in c for p in keep)) and not any(p in c for p in drop)}
    assert {p.split(".", 1)[1] for p in _adapted(trained) if p.startswith(denoiser + ".")} == expected


def test_targets_text_output_and_one_line_errors(sd_cli_lora):
    result = sd_cli_lora(["lora", "targets", "--model", "tiny:sd1", "--layer-filter", "proj_out"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("lora_unet_")]
    assert len(rows) == 4 and all("unet." in r and "proj_out" in r and " rank 16" in r for r in rows)
    assert "4 modules on sd1 (4 layers: unet 4)" in lines
    assert any(line.startswith("--layer-filter 'proj_out': matched 4 of 48 unet modules") for line in lines)
    bad = sd_cli_lora(["lora", "targets", "--model", "tiny:sd1", "--layer-filter", "nowhere"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.output.count("\n") == 1 and "--layer-filter: 'nowhere' matches none of the 48 unet" in bad.output


@pytest.fixture
def sd_cli_lora():
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    cli = build_cli(get_plugin_manager())
    return lambda args: CliRunner().invoke(cli, args)


def test_targets_help_imports_no_torch():
    probe = (
        "import sys\nfrom sdcore.cli import main\ntry:\n    main(['lora', 'targets', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'diffusers', 'transformers', 'safetensors') "
        "if m in sys.modules), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--layer-exclude" in result.stdout and "--lycoris-preset" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == "HEAVY="


def test_layer_exclude_wins_over_the_filter_and_may_match_nothing():
    method = LoraMethod(LoraOptions(rank=2, layer_filter="attn", layer_exclude="attn2, to_out, nothing_here"))
    method.validate()
    method.prepare(_meta("sd1"))
    paths = {p.split(".", 1)[1] for p in _adapted(method)}
    assert paths and all("attn1.to_" in p and "to_out" not in p for p in paths)
    with pytest.raises(Exception, match=r"--layer-exclude 'a\[': not a regular expression"):
        LoraMethod(LoraOptions(layer_exclude="a[", layer_filter_regex=True)).validate()


# --- OneTrainer layer_filter_preset --------------------------------------------------------------------------------

_OT_TYPES = {"sd1": "STABLE_DIFFUSION_15", "sdxl": "STABLE_DIFFUSION_XL_10_BASE", "sd3": "STABLE_DIFFUSION_3",
             "flux": "FLUX_DEV_1", "chroma": "CHROMA_1"}  # fmt: skip
#: Base*Setup.LAYER_PRESETS, as OneTrainer writes them (rewritten here, not imported from sdcore)
_OT_PRESETS = {
    "sd1": {"attn-mlp": ["attentions"], "attn-only": ["attn"]},
    "sdxl": {"attn-mlp": ["attentions"], "attn-only": ["attn"]},
    "sd3": {"attn-only": ["attn"], "blocks": ["transformer_block"]},
    "flux": {"attn-mlp": ["attn", "ff.net", "proj_mlp"], "attn-only": ["attn"], "blocks": ["transformer_block"]},
    "chroma": {"attn-mlp": ["attn", "ff.net", "proj_mlp"], "attn-only": ["attn"], "blocks": ["transformer_block"]},
}


def _ot_options(tmp_path, family, preset, patterns, notes, **extra):
    from sdcore.train.config import load_options

    config = {"training_method": "LORA", "model_type": _OT_TYPES[family], "base_model_name": f"tiny:{family}",
              "lora_rank": 2, "lora_alpha": 1.0, "resolution": "64", "layer_filter_preset": preset,
              "layer_filter": ",".join(patterns), "text_encoder": {"train": False},
              **({"text_encoder_2": {"train": False}} if family == "flux" else {}),
              "output_model_format": "KOHYA_LORA" if family in ("sd1", "sdxl") else "DIFFUSERS_LORA", **extra}  # fmt: skip
    path = tmp_path / "ot.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return load_options(LoraOptions, path, notes=notes)


@pytest.mark.parametrize("family", list(_OT_PRESETS))
def test_onetrainer_presets_adapt_exactly_what_onetrainer_selects(tmp_path, family):
    layers = _layers(family)
    for preset, patterns in _OT_PRESETS[family].items():
        for written in (patterns, []):  # as the UI saves it, and the preset name alone (the UI fills the patterns)
            notes: list[str] = []
            o = _ot_options(tmp_path, family, preset, written, notes)
            assert not any("layer_filter" in n for n in notes), (preset, notes)
            method = LoraMethod(o)
            method.validate()
            method.prepare(_meta(family))
            denoiser = method.index.denoiser
            got = {p.split(".", 1)[1] for p in _adapted(method) if p.startswith(denoiser + ".")}
            # LoRAModuleWrapper + ModuleFilter: every Linear/Conv2d whose name contains a pattern
            assert got == {n for n in layers if any(p in n for p in patterns)}, (family, preset)


@pytest.mark.parametrize("family", list(_OT_PRESETS))
def test_onetrainer_full_preset_notes_the_layers_sdcore_leaves_out(tmp_path, family):
    notes: list[str] = []
    o = _ot_options(tmp_path, family, "full", [], notes)
    (note,) = [n for n in notes if "layer_filter_preset full" in n]
    method = LoraMethod(o)
    method.prepare(_meta(family))
    layers = _layers(family)
    denoiser = method.index.denoiser
    outside = layers - {p.split(".", 1)[1] for p in _adapted(method) if p.startswith(denoiser + ".")}
    named = note.split("OneTrainer also adapts ", 1)[1].split(", ")
    # every layer OneTrainer's full adapts and sdcore does not is under one of the named modules, each named one is
    assert outside and all(any(n == m or n.startswith(m + ".") for m in named) for n in outside), (outside, named)
    assert all(any(n == m or n.startswith(m + ".") for n in outside) for m in named), (outside, named)


# --- ai-toolkit only_if_contains / ignore_if_contains --------------------------------------------------------------


def _ai_toolkit_keeps(path: str, prefix: str, sep: str, only, ignore) -> bool:
    """lora_special.create_modules, rewritten for one module of the denoiser."""
    clean = f"{prefix}.{path}"
    lora_name = clean.replace(".", sep)
    if any(word in clean for word in ignore or []):
        return False
    return only is None or any(w in clean for w in only) or any(w in lora_name for w in only)


def _job(tmp_path, process):
    import yaml

    path = tmp_path / "job.yaml"
    data = {"job": "extension", "config": {"name": "run", "process": [{"type": "sd_trainer", **process}]}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("family", "model", "only", "ignore"),
    [
        ("flux", {"is_flux": True}, ["transformer.single_transformer_blocks.", "transformer$$transformer_blocks$$0$$"],
         ["proj_mlp", "transformer.single_transformer_blocks.1."]),
        ("flux", {"is_flux": True}, ["attn.to_q"], None),
        ("sd1", {}, ["lora_unet_down_blocks_0", "mid_block.attentions"], ["attn2", "transformer.nowhere"]),
        ("sdxl", {"is_xl": True}, None, ["unet.up_blocks", "to_out"]),
        # SDXL's LoRA names (lora_unet_..., dots written "_") and dotted paths; ignore is matched on the dotted name
        ("sdxl", {"is_xl": True}, ["lora_unet_up_blocks_0_attentions_1", "lora_unet.down_blocks.1.attentions.0."],
         ["ff.net", "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn1"]),
    ],
)  # fmt: skip
def test_ai_toolkit_contains_lists_select_what_ai_toolkit_selects(tmp_path, family, model, only, ignore):
    from sdcore.train.config import load_options

    kwargs = {k: v for k, v in (("only_if_contains", only), ("ignore_if_contains", ignore)) if v is not None}
    process = {"model": {"name_or_path": f"tiny:{family}", **model}, "datasets": [{"folder_path": "imgs"}],
               "network": {"type": "lora", "linear": 2, "network_kwargs": kwargs}}  # fmt: skip
    o = load_options(LoraOptions, _job(tmp_path, process), notes=[])
    plain = LoraMethod(LoraOptions(rank=2, split_qkv=o.split_qkv))
    plain.prepare(_meta(family))
    denoiser = plain.index.denoiser
    candidates = {p.split(".", 1)[1] for p in _adapted(plain) if p.startswith(denoiser + ".")}
    prefix, sep = ("transformer", "$$") if family == "flux" else ("lora_unet", "_")
    expected = {c for c in candidates if _ai_toolkit_keeps(c, prefix, sep, only, ignore)}
    assert expected and expected != candidates
    method = LoraMethod(o)
    method.validate()
    method.prepare(_meta(family))
    assert {p.split(".", 1)[1] for p in _adapted(method) if p.startswith(denoiser + ".")} == expected
    if only == ["attn.to_q"]:  # plain words stay plain substrings
        assert (o.layer_filter, o.layer_filter_regex) == ("attn.to_q", False)


def test_ai_toolkit_other_network_kwargs_are_refused_in_one_line(tmp_path):
    from sdcore.errors import ConfigError
    from sdcore.train.config import load_options

    process = {"model": {"name_or_path": "tiny:sd1"}, "datasets": [{"folder_path": "imgs"}],
               "network": {"network_kwargs": {"only_if_contains": "attn", "block_dims": [1]}}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_options(LoraOptions, _job(tmp_path, process), notes=[])
    problems = info.value.problems
    assert any("sdcore implements only_if_contains and ignore_if_contains (got ['block_dims'])" in p for p in problems)
    assert any("only_if_contains: a list of strings, got 'attn'" in p for p in problems)
    assert all("\n" not in p for p in problems)
    # ai-toolkit's Chroma names its modules in BFL's layout: the words cannot be matched on diffusers paths
    chroma = {"model": {"name_or_path": "tiny:chroma", "arch": "chroma"}, "datasets": [{"folder_path": "imgs"}],
              "network": {"network_kwargs": {"ignore_if_contains": ["img_attn"]}}}  # fmt: skip
    with pytest.raises(ConfigError, match="ai-toolkit's Chroma matches these words against its BFL-layout"):
        load_options(LoraOptions, _job(tmp_path, chroma), notes=[])
    # written in network itself: ai-toolkit's NetworkConfig does not read them there (network_kwargs only)
    misplaced = {"model": {"name_or_path": "tiny:flux", "is_flux": True}, "datasets": [{"folder_path": "imgs"}],
                 "network": {"only_if_contains": ["single_transformer_blocks"]}}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_options(LoraOptions, _job(tmp_path, misplaced), notes=[])
    assert info.value.problems[0].endswith(
        "process.network: unknown ai-toolkit field(s): 'only_if_contains' (ai-toolkit reads only_if_contains from "
        "network.network_kwargs only and ignores it here: move it there)"
    )


def test_ai_toolkit_flux_job_with_contains_lists_trains_the_selected_modules(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from safetensors import safe_open
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager
    from sdcore.testing.datasets import make_tiny_dataset

    monkeypatch.chdir(tmp_path)
    make_tiny_dataset(tmp_path / "data", n=2, size=64)
    process = {
        "training_folder": "out",
        "network": {"type": "lora", "linear": 2, "linear_alpha": 2,
                    "network_kwargs": {"only_if_contains": ["transformer.single_transformer_blocks."],
                                       "ignore_if_contains": ["proj_out"]}},
        "save": {"dtype": "float32", "save_every": 100},
        "datasets": [{"folder_path": "data/1_sks", "caption_ext": "txt", "resolution": [64]}],
        "train": {"steps": 2, "lr": 1e-2, "optimizer": "adamw", "noise_scheduler": "flowmatch",
                  "gradient_checkpointing": False, "disable_sampling": True},
        "model": {"name_or_path": "tiny:flux", "is_flux": True},
    }  # fmt: skip
    result = CliRunner().invoke(build_cli(get_plugin_manager()), ["train", "lora", "--config",
                                                                   str(_job(tmp_path, process)), "--no-progress"])  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    with safe_open(str(tmp_path / "out" / "run" / "run.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in tensors}
    layers = _layers("flux")
    expected = {n for n in layers if n.startswith("single_transformer_blocks.") and "proj_out" not in n}
    assert modules == expected
    assert all(torch.count_nonzero(t) > 0 for k, t in tensors.items() if "lora_B" in k), "both steps trained them"


def test_targets_takes_model_names_from_models_dir(tmp_path, sd_cli_lora):
    """``--models-dir`` is one of the training model options ``lora targets`` takes: ``--model NAME`` is looked up
    there as ``sdcore train lora`` looks it up, and lists what the file's path lists; a name found nowhere is the
    training pre-flight's one line, exit status 2."""
    from sdcore.models.load import load_model

    models = tmp_path / "models"
    path = load_model("tiny:sd1").save(models / "Stable-diffusion" / "sd15" / "tiny.safetensors")
    by_path = sd_cli_lora(["lora", "targets", "--model", str(path), "--json"])
    by_name = sd_cli_lora(["lora", "targets", "--models-dir", str(models), "--model", "tiny", "--json"])
    assert by_path.exit_code == 0 and by_name.exit_code == 0, by_name.output
    listed = json.loads(by_name.stdout[by_name.stdout.index("{") :])
    assert listed["family"] == "sd1" and listed["modules"]
    assert listed == json.loads(by_path.stdout[by_path.stdout.index("{") :])
    missing = sd_cli_lora(["lora", "targets", "--models-dir", str(models), "--model", "tiyn"])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    checkpoints = ", ".join(
        str(models / n) for n in ("checkpoints", "Stable-diffusion", "unet", "diffusion_models", "diffusers")
    )
    assert missing.output.splitlines() == [
        f"Error: tiyn: no such model file or folder; nor is it a model name in {checkpoints} and their subfolders; "
        "models there: sd15/tiny.safetensors"
    ]
