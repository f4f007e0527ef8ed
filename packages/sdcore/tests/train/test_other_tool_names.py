"""Other tools' option names (``kohya.NAME_HINTS``): A1111's Train-tab fields typed as ``sdcore train`` options stay
errors, and the error says which sdcore option means the same (or that none does) instead of the nearest spelling
(``--initialization-text`` used to suggest ``--initial-step``, ``--clip-grad-mode`` ``--clip-g``)."""

from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner
from sdcore.errors import ConfigError
from sdcore.train.config import load_options
from sdcore.train.kohya import NAME_HINTS, is_kohya_name


def _pm():
    """Every method of this repository (the table's targets are checked against all of them)."""
    import sdplugin_apt.plugin
    import sdplugin_dreambooth.plugin
    import sdplugin_hn.plugin
    import sdplugin_lora.plugin
    import sdplugin_ti.plugin
    from sdcore.plugins import get_plugin_manager

    plugins = [sdplugin_lora.plugin, sdplugin_ti.plugin, sdplugin_hn.plugin, sdplugin_apt.plugin]
    return get_plugin_manager(entrypoints=False, extra=[*plugins, sdplugin_dreambooth.plugin])


def _error(method: str, *args: str) -> str:
    from sdcore.cli import build_cli

    result = CliRunner().invoke(build_cli(_pm()), ["train", method, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


# A1111's names (its train_embedding / train_hypernetwork parameters and Train-tab fields) -> the sdcore option
# that means the same, on `sdcore train ti`
SAME_MEANING = {
    "--learn-rate": "--lr",
    "--create-image-every": "--sample-every",
    "--save-embedding-every": "--save-every",
    "--save-hypernetwork-every": "--save-every",
    "--template-file": "--template",
    "--template-filename": "--template",
    "--data-root": "--data",
    "--gradient-step": "--gradient-accumulation",
    "--steps": "--max-steps",
    "--initialization-text": "--init-text",
    "--shuffle-tags": "--shuffle-caption",
    "--tag-drop-out": "--tag-dropout",
    "--latent-sampling-method": "--latent-sampling",
    "--clip-grad-mode": "--grad-clip-method",
    "--clip-grad-value": "--max-grad-norm",
    "--dataset-filename-word-regex": "--filename-word-regex",  # A1111's Settings > Training, for the Train tab
    "--dataset-filename-join-string": "--filename-join-string",
}


@pytest.mark.parametrize("typed", sorted(SAME_MEANING))
def test_a1111_train_tab_names_suggest_the_option_that_means_the_same(typed):
    name = typed[2:].replace("-", "_")
    line = _error("ti", typed, "1")
    assert line.startswith(f"Error: No such option: {typed} (did you mean {SAME_MEANING[typed]} (A1111's {name})?")


def test_the_hint_in_full_with_its_note_and_without():
    assert _error("ti", "--save-embedding-every", "50") == (
        "Error: No such option: --save-embedding-every (did you mean --save-every (A1111's save_embedding_every)?)"
    )
    assert _error("hn", "--clip-grad-mode", "value") == (
        "Error: No such option: --clip-grad-mode (did you mean --grad-clip-method (A1111's clip_grad_mode)? norm or "
        "value; A1111's 'disabled' (its default) is --max-grad-norm 0)"
    )
    # the underscore spelling, as A1111's code and API write it, is the same name
    assert _error("ti", "--tag_drop_out", "0.1") == (
        "Error: No such option: --tag_drop_out (did you mean --tag-dropout (A1111's tag_drop_out)?)"
    )
    # and in any case, as the other tables read names (hint_key): --Save_Embedding_Every got click's nearest spelling
    assert _error("ti", "--Save_Embedding_Every", "50") == (
        "Error: No such option: --Save_Embedding_Every (did you mean --save-every (A1111's save_embedding_every)?)"
    )


def test_names_without_an_equivalent_say_so_and_method_options_name_their_method():
    assert _error("ti", "--log-directory", "logs") == (
        "Error: No such option: --log-directory (A1111's log_directory: no single equivalent: A1111 writes its "
        "saves, previews and loss log there; sdcore writes the saves (--save-every) and the previews beside "
        "--output, and TensorBoard logs to --log-dir)"
    )
    assert "(A1111's varsize: no equivalent:" in _error("ti", "--varsize")
    # alpha weighting is kohya's --alpha-mask, with A1111's per-image rescaling said, not passed over
    assert _error("ti", "--use-weight").startswith(
        "Error: No such option: --use-weight (did you mean --alpha-mask (A1111's use_weight)? kohya's alpha weighting, "
        "the same within an image whose alpha reaches 0; A1111 also rescales each image's weights to a mean of 1"
    )
    assert _error("lora", "--initialization-text", "cat") == (
        "Error: No such option: --initialization-text (A1111's initialization_text is --init-text of "
        "`sdcore train ti, apt`, not of this method)"
    )
    assert "(A1111's latent_sampling_method is --latent-sampling of `sdcore train ti, apt`" in _error(
        "hn", "--latent-sampling-method", "once"
    )
    # names A1111 shares with sdcore or kohya need no entry: --batch-size is sdcore's, --num_vectors_per_token kohya's
    assert "did you mean --vectors?" in _error("ti", "--num-vectors-per-token", "2")
    assert "--batch-size" not in _error("ti", "--batch-size", "2", "--no-such-flag")


def test_a_config_key_gets_the_same_hint(tmp_path):
    from sdplugin_ti.method import TIOptions

    config = tmp_path / "a1111.toml"
    config.write_text("learn_rate = 0.005\nsave_embedding_every = 500\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_options(TIOptions, config)
    message = str(info.value)
    assert "'learn_rate' (did you mean 'lr' (A1111's learn_rate)?" in message
    assert "'save_embedding_every' (did you mean 'save_every' (A1111's save_embedding_every)?)" in message


@pytest.mark.parametrize(
    ("method", "typed", "said"),
    [
        ("lora", "--dim", "(did you mean --rank (kohya's network_dim)?)"),
        ("ti", "--dim", "(kohya's network_dim is --rank of `sdcore train lora, locon`, not of this method)"),
        ("lora", "--images", "(did you mean --data?)"),
        ("lora", "--checkpointing-steps", "(did you mean --save-every (diffusers' checkpointing_steps)?)"),
        (
            "lora",
            "--instance-data-dir",
            "(did you mean --data (diffusers' instance_data_dir)? sdcore captions each "
            "image by its caption file (.txt) or, without one, by its folder's name, kohya's N_<prompt> (10_sks dog, "
            "inside --data); or run the diffusers command as written: sdcore train lora --config train.sh)",
        ),
        (
            "lora",
            "--instance_prompt",
            "(diffusers' instance_prompt is --instance-prompt of `sdcore train dreambooth`, "
            "not of this method; with this method sdcore captions each image by its caption file (.txt) or, without "
            "one, by its folder's name, kohya's N_<prompt> (10_sks dog, inside --data); or run the diffusers command "
            "as written: sdcore train lora --config train.sh)",
        ),
    ],
)
def test_other_trainers_names_and_short_forms(method, typed, said):
    """diffusers' script names and short forms typed on the command line: ``--instance-prompt`` got "did you mean
    --sample-prompts?", ``--dim`` "did you mean --ema?", neither meaning what was typed."""
    assert _error(method, typed, "x") == f"Error: No such option: {typed} {said}"


def test_the_table_never_shadows_an_accepted_name_and_its_targets_exist():
    """A key that is a kohya name or an sdcore option would be accepted before the hint is ever said; a target must
    be an option of the methods named (of every method where none are named)."""
    pm = _pm()
    methods = {name: spec for name, spec in pm.methods().items() if spec.name == name}
    fields = {name: {f.name for f in dataclasses.fields(spec.load().options_class)} for name, spec in methods.items()}
    every = set.union(*fields.values())
    for name, hint in NAME_HINTS.items():
        # an option of some methods only (DreamBooth's instance_prompt) is a hint on the others: its methods say which
        own = hint.target == name and bool(hint.methods)
        assert not is_kohya_name(name) and (name not in every or own), name
        if not hint.target:
            assert hint.note, name
            continue
        named = [m.strip() for m in hint.methods.split(",")] if hint.methods else list(fields)
        assert all(hint.target in fields[m] for m in named), (name, hint.target)
        if hint.methods:
            assert all(hint.target not in fields[m] for m in fields if m not in named), (name, hint.target)


@pytest.mark.parametrize("method", ["lora", "ti"])
def test_a_family_flag_says_the_family_comes_from_the_model(method):
    """``--sdxl`` (kohya's tools, other trainers) got click's "Did you mean one of: '--sdpa', '--seed', '--t5xxl'?"."""
    assert _error(method, "--sdxl") == (
        "Error: No such option: --sdxl (not needed: sdcore reads the model family (SD1, SD2, SDXL, SD3, FLUX.1 ...) "
        "from the model itself; kohya picks it by script (sdxl_train_network.py) and some tools by a flag)"
    )
    assert "(not needed: sdcore reads the model family" in _error(method, "--flux")
    # kohya's own --v2 and --v_parameterization are accepted (the family from the model, v-prediction as kohya's)
    from sdcore.cli import build_cli

    for flag in ("--v2", "--v_parameterization"):
        result = CliRunner().invoke(build_cli(_pm()), ["train", method, flag, "--help"])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("flag", ["--sdxl", "--sd3", "--flux", "--v2"])
def test_sdcore_generate_says_a_family_flag_is_not_needed(flag):
    """``sdcore generate --sdxl`` got click's "Did you mean one of: '--seed', '--style', '--t5xxl'?"; generate has
    no --v2 either (only the training commands accept kohya's). Other unknown options keep click's suggestion."""
    from sdcore.cli import build_cli

    result = CliRunner().invoke(build_cli(_pm()), ["generate", "-m", "tiny:sd1", flag, "a cat"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: No such option: {flag} (not needed: sdcore reads the model family (SD1, SD2, SDXL, SD3, FLUX.1 ...) "
        "from the model itself; kohya picks it by script (sdxl_train_network.py) and some tools by a flag)"
    )
    typo = CliRunner().invoke(build_cli(_pm()), ["generate", "-m", "tiny:sd1", "--sedd", "3", "a cat"])
    assert typo.exit_code == 2 and "Did you mean" in typo.output and "--seed" in typo.output


def test_a1111_preview_and_create_hypernetwork_fields():
    """The Train tab's preview fields and the Create hypernetwork fields: each says what sdcore has, where the
    nearest spelling was wrong (--weight-init suggested kohya's --weights of ti, --dropout-structure
    --t5-dropout-rate, --nvpt --t5)."""
    assert "(A1111's save_image_with_stored_embedding: no equivalent:" in _error(
        "ti", "--save-image-with-stored-embedding"
    )
    assert "(A1111's preview_from_txt2img: no equivalent: write the preview's prompt and settings as a " in _error(
        "ti", "--preview-from-txt2img"
    )
    assert "(did you mean --vectors (A1111's nvpt)?)" in _error("ti", "--nvpt", "2")
    assert "(did you mean --init (A1111's weight_init)? A1111's names" in _error("hn", "--weight-init", "Normal")
    assert _error("hn", "--dropout-structure", "0,0.1,0").endswith(
        "(A1111's dropout_structure: the hypernetwork's dropout is --dropout of `sdcore train hn`, the structure "
        "itself (e.g. 0,0.1,0))"
    )
    assert "(A1111's use_dropout: a checkbox in A1111; the hypernetwork's dropout is --dropout" in _error(
        "lora", "--use-dropout"
    )
    assert "(did you mean --layer-norm (A1111's add_layer_norm)?)" in _error("hn", "--add-layer-norm")
    assert "(A1111's weight_init is --init of `sdcore train hn`, not of this method)" in _error(
        "ti", "--weight-init", "Normal"
    )
