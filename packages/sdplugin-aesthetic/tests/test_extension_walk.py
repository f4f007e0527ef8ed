"""An A1111 aesthetic-gradients extension user's walk: the extension's names and habits on sdcore's commands."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from PIL import Image


def _cli():
    import sdplugin_aesthetic.plugin
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager(entrypoints=False, extra=[sdplugin_aesthetic.plugin]))


def _generate_error(*args: str) -> str:
    result = CliRunner().invoke(_cli(), ["generate", "-m", "tiny:sd1", "--aesthetic", "style", *args, "a castle"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


# the extension's UI fields (scripts/aesthetic.py, aesthetic_clip.create_ui) and vicgalle's txt2img.py arguments
# as a user types them -> the sdcore option that means the same
SAME_MEANING = {
    "--is-negative-text": "--aesthetic-text-negative",
    "--aesthetic-is-negative-text": "--aesthetic-text-negative",
    "--aesthetic-learning-rate": "--aesthetic-lr",
    "--aesthetic-imgs": "--aesthetic NAME",
    "--aesthetic-embedding": "--aesthetic NAME",
    "--aesthetic-imgs-text": "--aesthetic-text",
    "--slerp-angle": "--aesthetic-slerp-angle",
    "--slerp-interpolation": "--aesthetic-slerp",
    "--aesthetic_steps": "--aesthetic-steps",
    "--aesthetic_lr": "--aesthetic-lr",
    "--aesthetic_embedding": "--aesthetic NAME",
}


@pytest.mark.parametrize("typed", sorted(SAME_MEANING))
def test_extension_names_on_generate_name_the_option_that_means_the_same(typed: str) -> None:
    """``--is-negative-text`` got click's "Did you mean one of: '--aesthetic-negative', ...": a switch that
    personalises the negative prompt, not the one that moves away from the aesthetic text."""
    args = [typed] if "negative" in typed or "interpolation" in typed else [typed, "1"]
    line = _generate_error(*args)
    assert line.startswith(f"Error: No such option: {typed} (")
    assert SAME_MEANING[typed] in line
    assert "Did you mean one of" not in line
    if "negative" in typed:
        assert "--aesthetic-negative is another switch" in line


def test_other_unknown_generate_options_keep_clicks_suggestion() -> None:
    line = _generate_error("--aesthetic-wieght", "0.5")
    assert "Did you mean" in line and "--aesthetic-weight" in line


def test_create_refuses_an_existing_output_before_loading_clip(tmp_path) -> None:
    """``sdcore aesthetic create ... -o style.pt`` replaced an existing style.pt in silence (sdcore's rule for every
    written file: an error unless --overwrite, found before any model loads)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    out = tmp_path / "style.pt"
    out.write_bytes(b"keep me")
    args = ["aesthetic", "create", str(images), "--clip", str(tmp_path / "no-clip"), "-o", str(out)]
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"{out} already exists; pass --overwrite to replace it" in result.output
    assert out.read_bytes() == b"keep me"
    # with --overwrite it goes on (and fails here on the missing CLIP model, not on the output)
    again = CliRunner().invoke(_cli(), [*args, "--overwrite"])
    assert "already exists" not in again.output and "no-clip" in again.output


def test_a_missing_embedding_says_where_the_extension_keeps_its_files(tmp_path) -> None:
    """The not-found message said the default folder is "the aesthetic_embeddings folder of --models-dir, as in
    A1111", but the extension keeps its files in its own folder (scripts.basedir()/aesthetic_embeddings)."""
    (tmp_path / "models" / "aesthetic_embeddings").mkdir(parents=True)
    args = ["generate", "-m", "tiny:sd1", "--models-dir", str(tmp_path / "models"), "--aesthetic", "gloomcore"]
    result = CliRunner().invoke(_cli(), [*args, "-o", str(tmp_path / "x.png"), "a castle"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "aesthetic embedding 'gloomcore' not found" in result.output
    assert "as in A1111" not in result.output
    assert "extensions/stable-diffusion-webui-aesthetic-gradients/aesthetic_embeddings" in result.output
    assert "--aesthetic-dir" in result.output
