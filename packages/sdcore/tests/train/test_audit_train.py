"""Defects a kohya/A1111 user met running ``sdcore train`` twice into one output (the newcomer audit)."""

from __future__ import annotations

from runtime_methods import ConvOutMethod
from sdcore.models.tiny import create_tiny_bundle
from sdcore.testing.contract import contract_options
from sdcore.train.loop import train
from sdcore.train.state import list_states, read_position, resolve_resume


def _run(tmp_path, steps: int, **extra) -> None:
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": steps, "batch_size": 1, **extra})
    train(ConvOutMethod(o), bundle=create_tiny_bundle("sd1"))


def test_a_new_shorter_run_keeps_its_own_state_and_latest_resumes_it(tmp_path):
    """A 6-step run, then a fresh 3-step run into the same --output: the second run's last line said
    "resumable state in run/result-state", but keeping the newest 1 state pruned by step number, so the
    new step-00000003 was deleted at once and ``--resume latest`` picked the earlier run's step 6."""
    _run(tmp_path, 6)
    root = tmp_path / "run" / "result-state"
    assert [p.name for p in list_states(root)] == ["step-00000006"]
    _run(tmp_path, 3)
    assert [p.name for p in list_states(root)] == ["step-00000003"]
    position, _ = read_position(resolve_resume("latest", root))
    assert position.step == 3


def test_with_every_state_kept_latest_is_the_newest_written_not_the_highest_step(tmp_path):
    _run(tmp_path, 6, keep_states=0)
    _run(tmp_path, 3, keep_states=0)
    root = tmp_path / "run" / "result-state"
    assert sorted(p.name for p in list_states(root)) == ["step-00000003", "step-00000006"]
    assert resolve_resume("latest", root).name == "step-00000003"
    assert list_states(root)[-1].name == "step-00000003"  # newest last, as prune_states reads it


def test_resume_of_a_kohya_style_state_name_that_is_not_there_names_the_runs_states(tmp_path):
    """kohya's ``--resume out/kchar-000002-state`` (its epoch state's name) said "not a training state folder
    (no train_state.json)" of a folder that does not exist; sdcore's states are ``kchar-state/step-NNNNNNNN``."""
    import pytest
    from sdcore.errors import ConfigError

    _run(tmp_path, 4, save_every=2, keep_states=0)
    root = tmp_path / "run" / "result-state"
    missing = str(tmp_path / "run" / "result-000002-state")
    with pytest.raises(ConfigError) as caught:
        resolve_resume(missing, root)
    message = str(caught.value)
    assert message.startswith(f"--resume {missing}: no such state folder; this --output's states are in {root}")
    assert "step-00000002, step-00000004 (--resume latest continues step-00000004, the newest)" in message
    with pytest.raises(ConfigError, match=r"no such state folder$"):
        resolve_resume(missing, tmp_path / "nothing-state")


def test_train_method_help_opens_with_what_it_does_not_the_classes_developer_notes():
    """``sdcore train ti --help`` printed TIMethod's whole docstring: "Generic in its options so a method built on
    it (DreamArtist's ``APTMethod(TIMethod[APTOptions])``) keeps its own options type; ...", reST quotes and all."""
    import sdplugin_apt.plugin
    import sdplugin_dreambooth.plugin
    import sdplugin_hn.plugin
    import sdplugin_lora.plugin
    import sdplugin_ti.plugin
    from click.testing import CliRunner
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    plugins = [sdplugin_lora.plugin, sdplugin_ti.plugin, sdplugin_hn.plugin, sdplugin_apt.plugin]
    cli = build_cli(get_plugin_manager(entrypoints=False, extra=[*plugins, sdplugin_dreambooth.plugin]))
    for method in ("ti", "apt", "hn", "lora", "locon", "dreambooth"):
        result = CliRunner().invoke(cli, ["train", method, "--help"])
        assert result.exit_code == 0, result.output
        opening = result.output.split("Options:", 1)[0]
        assert "``" not in opening and "TIMethod" not in opening and "Generic" not in opening, (method, opening)
        assert len(opening.split()) > 4, (method, opening)  # still says what the method does
    ti = CliRunner().invoke(cli, ["train", "ti", "--help"]).output.split("Options:", 1)[0]
    assert "Train one embedding (--name) with A1111 templates, schedule and file format." in " ".join(ti.split())


def test_a_run_into_an_output_with_an_earlier_runs_state_says_it_starts_afresh(tmp_path):
    """Running an ai-toolkit job (or any config) again after a crash started over in silence and its first state
    replaced the earlier run's: ai-toolkit itself continues from the folder's newest save. The pre-flight says so
    and names ``--resume latest``; with ``--resume`` there is nothing to say."""
    from sdcore.train.preflight import run_preflight

    _run(tmp_path, 3)
    root = tmp_path / "run" / "result-state"
    o = contract_options(ConvOutMethod, tmp_path, {"max_steps": 5, "batch_size": 1})
    notes = [n for n in run_preflight(ConvOutMethod(o), o, plan=False).notes if "earlier run" in n]
    assert notes == [
        f"{root} holds the resumable state of an earlier run (step 3): this run starts afresh without --resume and "
        "its own states replace it as they are saved (--keep-states 1); to continue the earlier run instead, add "
        "--resume latest"
    ]
    o.save_state = False
    (note,) = [n for n in run_preflight(ConvOutMethod(o), o, plan=False).notes if "earlier run" in n]
    assert "writes no state of its own (--no-save-state)" in note
    o.save_state, o.resume = True, "latest"
    assert not [n for n in run_preflight(ConvOutMethod(o), o, plan=False).notes if "earlier run" in n]
    fresh = contract_options(ConvOutMethod, tmp_path / "other", {"max_steps": 5, "batch_size": 1})
    assert not [n for n in run_preflight(ConvOutMethod(fresh), fresh, plan=False).notes if "earlier run" in n]


def test_resume_of_the_result_file_names_the_runs_states(tmp_path):
    """``--resume run/result.safetensors`` (the weights, where kohya users load a LoRA to continue) said only "not a
    training state folder (no train_state.json)"; like a missing kohya-style name, it now says where the states
    are and what --resume latest continues."""
    import pytest
    from sdcore.errors import ConfigError

    _run(tmp_path, 2)
    root = tmp_path / "run" / "result-state"
    result = next((tmp_path / "run").glob("result*.safetensors"))
    with pytest.raises(ConfigError) as caught:
        resolve_resume(str(result), root)
    assert str(caught.value) == (
        f"--resume {result}: not a training state folder (no train_state.json); this --output's states are in "
        f"{root}: step-00000002 (--resume latest continues step-00000002, the newest)"
    )


def test_a_resume_compares_a_text_options_numbers_not_their_spelling():
    """APT's --cfg-scale is text (default "3.0"): a run given ``--cfg-scale 3`` and resumed without it (or TI's rate
    schedule typed ``0.005:10,0.001`` once and ``5e-3:10, 1e-3`` again) warned that the run would not match an
    uninterrupted one, though nothing changed. A real change still counts."""
    from sdcore.train.checkpoints import same_setting

    assert same_setting("3.0", "3")
    assert same_setting("5e-3:10, 1e-3", "0.005:10,0.001")
    assert same_setting("3-1:cos", "3.0-1.0:cos")
    assert same_setting("subject_filewords", "subject_filewords")
    assert not same_setting("3.0", "4")
    assert not same_setting("3-1:cos", "3-1:ln")
    assert not same_setting("5e-3:10, 1e-3", "5e-3:20, 1e-3")
    assert not same_setting("3-1", "3")
    assert not same_setting("subject_filewords", "style_filewords")
    assert not same_setting(512, 768)
