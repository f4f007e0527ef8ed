"""Network tags are resolved before the model loads (``NetworkSession.check``), all at once, with the session's
own lookup: ``sdcore generate`` reports every missing LoRA / LyCORIS / hypernetwork file of every prompt (hires
prompts, X/Y/Z plot cells after Prompt S/R, ``--style`` texts) in one line and exits 2 without loading a model."""

from __future__ import annotations

import pytest
import torch
from cli_errors import one_error_line
from click.testing import CliRunner
from sdcore.builtin import generate_command
from sdcore.errors import NetworkMismatchError
from sdcore.generate.networks import Activation, PromptNetworkHandler
from sdcore.generate.session import NetworkSession, session_from_plugin_manager


def _pm():
    import sdplugin_hn.plugin
    import sdplugin_lora.plugin
    from sdcore.plugins import get_plugin_manager

    return get_plugin_manager(entrypoints=False, extra=[sdplugin_lora.plugin, sdplugin_hn.plugin])


def _lora(bundle, folder, name, seed=0):
    """A tiny SD1 LoRA saved with the plugin's own writer (the UNet's attention layers, rank 2)."""
    from sdplugin_lora.format import network_metadata, save_lora
    from sdplugin_lora.naming import ModuleIndex
    from sdplugin_lora.network import LoraNetwork

    network = LoraNetwork.create(ModuleIndex.from_bundle(bundle).select(conv=False), rank=2, alpha=2.0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator) * 0.5)
    return save_lora(folder / name, network.state_dict(), network_metadata(family="sd1", rank=2, alpha=2.0))


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model must not load"))


def _sdcore(tmp_path, *args):
    from sdcore.cli import build_cli

    out = str(tmp_path / "out.png")
    return CliRunner().invoke(build_cli(_pm()), ["generate", "-m", "tiny:sd1", *args, "-o", out])


_error = one_error_line  # exit 2, one Error: line, no traceback


def test_missing_files_of_the_prompt_and_of_a_prompt_sr_cell_in_one_line_before_loading(tmp_path, no_load, sd1):
    lora_dir = tmp_path / "Lora"
    _lora(sd1, lora_dir, "ep-000004.safetensors")
    result = _sdcore(
        tmp_path,
        "castle <lora:ep-000004:1> <lora:gone:0.5>",
        *("--lora-dir", str(lora_dir), "--x-type", "Prompt S/R", "--x-values", "ep-000004,ep-000009"),
    )
    # one handler's missing names share the line the session gives for one, with the names it offers
    assert _error(result) == (
        f"lora 'gone', 'ep-000009' not found in {lora_dir} and its subfolders; available: ep-000004; "
        "point --lora-dir at the folder with your LoRA files"
    )


def test_hires_prompts_styles_and_every_handler_are_checked_with_an_unknown_tag_in_todays_words(tmp_path, no_load, sd1):
    models = tmp_path / "models"
    _lora(sd1, models / "Lora", "present.safetensors")
    (models / "hypernetworks").mkdir(parents=True)
    (tmp_path / "styles.csv").write_text('name,prompt,negative_prompt\nfancy,"{prompt} <lyco:styled:1>",\n')
    result = _sdcore(
        tmp_path,
        "a <lora:present:1> <hypernet:hn:1> <lorra:typo:1>",
        *("--models-dir", str(models), "--style", "fancy"),
        *("--hires", "--hr-prompt", "b <lora:hires-only:1>"),
    )
    message = _error(result)
    lora = models / "Lora"
    tip = "point --lora-dir at the folder with your LoRA files (the default is the Lora folder of --models-dir, as in A1111)"
    for line in (
        "no handler for <lorra:typo:1> (tag 'lorra'); known tags: hypernet, lora, lyco",
        f"lora 'hires-only' not found in {lora} and its subfolders; available: present; {tip}",  # the hires pass's
        f"lyco 'styled' not found in {lora} and its subfolders; available: present; {tip}",  # brought in by --style
        f"hypernet 'hn' not found in {models / 'hypernetworks'} and its subfolders; available: none; point "
        "--hypernetwork-dir at the folder with your hypernetwork files (the default is the hypernetworks folder of "
        "--models-dir, as in A1111)",
    ):
        assert line in message
        message = message.replace(line, "", 1)
    assert message.strip("; ") == "", message  # nothing else: the present LoRA passed


def test_present_tags_pass_and_resolve_to_the_file_the_session_loads(tmp_path, monkeypatch, sd1):
    """The check and the generation choose the same file for each name: a stem in a subfolder, a name with
    its extension, a path, and ``<lyco:...>`` from the ``LyCORIS`` folder next to the LoRA folder."""
    lora_dir = tmp_path / "models" / "Lora"
    nested = _lora(sd1, lora_dir / "chars", "mychar.safetensors", seed=1)
    styled = _lora(sd1, lora_dir, "style.safetensors", seed=2)
    lyco = _lora(sd1, tmp_path / "models" / "LyCORIS", "loha.safetensors", seed=3)
    elsewhere = _lora(sd1, tmp_path / "elsewhere", "direct.safetensors", seed=4)
    seen: list[tuple[str, str, object]] = []
    find = PromptNetworkHandler.find

    def spy(self, name):
        path = find(self, name)
        seen.append((self.tag, name, path))
        return path

    def load(*args, **kwargs):
        seen.append(("loaded", "", None))
        return sd1

    monkeypatch.setattr(PromptNetworkHandler, "find", spy)
    monkeypatch.setattr(generate_command, "_load_bundle", load)
    prompt = f"x <lora:mychar:0.5> <lora:style.safetensors:0.5> <lyco:loha:0.5> <lora:{elsewhere}:0.5>"
    args = ["generate", "-m", "tiny:sd1", prompt, "--lora-dir", str(lora_dir), "--steps", "1", "--size", "32x32"]
    from sdcore.cli import build_cli

    result = CliRunner().invoke(build_cli(_pm()), [*args, "--device", "cpu", "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    cut = seen.index(("loaded", "", None))
    before, after = seen[:cut], seen[cut + 1 :]
    # the same lookups (the pre-load checks may look a name up more than once: the control-image check too)
    assert sorted(set(before), key=str) == sorted(set(after), key=str)
    assert {name: path for _, name, path in before} == {
        "mychar": nested,
        "style.safetensors": styled,
        "loha": lyco,
        str(elsewhere): elsewhere,
    }


def test_ambiguous_names_and_files_of_another_kind_get_the_sessions_message(tmp_path, sd1):
    lora_dir = tmp_path / "Lora"
    first, second = _lora(sd1, lora_dir / "a", "twin.safetensors"), _lora(sd1, lora_dir / "b", "twin.safetensors")
    (lora_dir / "emb").mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(2, 32)}, "name": "tok"}, lora_dir / "emb" / "tok.pt")
    session = session_from_plugin_manager(_pm(), {"lora_dir": lora_dir})
    problems = session.check([("a <lora:twin:1> <lora:tok:1>", "")])
    expected = []
    for name in ("twin", "tok"):
        with pytest.raises(NetworkMismatchError) as info:
            session.tagged["lora"].find(name)
        expected.append(str(info.value))
    assert problems == expected
    assert str(first) in problems[0] and str(second) in problems[0] and "not a LoRA file" in problems[1]


class _Names(PromptNetworkHandler):
    """A third party's tag whose names are no files (it resolves them itself)."""

    tag = "wild"

    def activate(self, bundle, refs, prompt, negative_prompt):
        return Activation(prompt, negative_prompt)


def test_check_collects_syntax_negative_and_tag_problems_and_leaves_other_resolvers_alone(tmp_path):
    session = NetworkSession({"wild": _Names(tmp_path)})
    assert session.check([("a <wild:anything:1>", "")]) == []  # not resolved with find: not judged early
    problems = session.check(
        [("a <wild:x:nan>", ""), ("b", "c <wild:y:1>"), ("d <odd:z:1> <wild:w:1>", ""), ("d <odd:z:1>", "")]
    )
    assert len(problems) == 3, problems  # the repeated unknown tag once
    assert problems[0].startswith("invalid weight 'nan' in <wild:x:nan>")
    assert problems[1].startswith("the negative prompt contains <wild:y:1>")
    assert problems[2] == "no handler for <odd:z:1> (tag 'odd'); known tags: wild"
    with pytest.raises(NetworkMismatchError, match=r"^no handler for <odd:z:1> \(tag 'odd'\); known tags: wild$"):
        session.parse("d <odd:z:1>")  # the message the session raises itself


class _Words(PromptNetworkHandler):
    """An untagged handler reading names from the prompt's words (as embeddings are), checking them early."""

    def __init__(self, directory=None):
        super().__init__(directory)
        self.seen: list[tuple[str, str]] = []

    def check_prompts(self, prompts):
        self.seen += prompts
        return [f"{word!r} is missing" for pair in prompts for text in pair for word in text.split() if "?" in word]

    def activate(self, bundle, refs, prompt, negative_prompt):
        return Activation(prompt, negative_prompt)


def test_untagged_handlers_check_the_prompt_words_before_loading(tmp_path):
    """An untagged handler's ``check_prompts`` sees every prompt once, tags removed, with the tagged checks: a
    missing ComfyUI ``embedding:NAME`` is said before the model loads like a missing LoRA."""
    words = _Words()
    session = NetworkSession({"wild": _Names(tmp_path), None: [words]})
    problems = session.check([("a <wild:x:1> b?", "neg?"), ("a <wild:x:1> b?", "neg?"), ("c", "")])
    assert words.seen == [("a  b?", "neg?"), ("c", "")]
    assert problems == ["'b?' is missing", "'neg?' is missing"]


def test_a_name_too_long_for_the_filesystem_is_not_found_not_a_traceback(tmp_path, no_load, sd1):
    """``<lora:xxx...:1>`` with a name past the OS's file-name limit used to raise ``OSError: File name too long``
    from the lookup; it is a name that matches no file."""
    lora_dir = tmp_path / "Lora"
    _lora(sd1, lora_dir, "present.safetensors")
    name = "x" * 300
    result = _sdcore(tmp_path, f"castle <lora:{name}:1>", "--lora-dir", str(lora_dir))
    assert _error(result) == (
        f"lora {name!r} not found in {lora_dir} and its subfolders; available: present; "
        "point --lora-dir at the folder with your LoRA files"
    )


def test_a_lora_missing_from_the_default_folder_says_where_it_looked_and_names_lora_dir(tmp_path, no_load, monkeypatch):
    """An A1111 user runs ``sdcore generate "<lora:mychar:1>"`` from a folder without A1111's ``models/Lora``: the
    error gives the folder searched as an absolute path (the default, relative to the current folder), says it does
    not exist, and names --lora-dir (and --models-dir, whose Lora folder is the default)."""
    monkeypatch.chdir(tmp_path)
    result = _sdcore(tmp_path, "castle <lora:mychar:1>")
    assert _error(result) == (
        f"lora 'mychar' not found in {tmp_path / 'models' / 'Lora'} and its subfolders, which does not exist (nor "
        f"does {tmp_path / 'models' / 'loras'}); available: none; point --lora-dir at the folder with your LoRA files (the default is the Lora folder of "
        "--models-dir, as in A1111)"
    )
    # a folder given with --lora-dir, relative: shown as the absolute path it is
    (tmp_path / "loras").mkdir()
    result = _sdcore(tmp_path, "castle <lora:mychar:1>", "--lora-dir", "loras")
    assert _error(result) == (
        f"lora 'mychar' not found in {tmp_path / 'loras'} and its subfolders; available: none; "
        "point --lora-dir at the folder with your LoRA files"
    )


def test_the_same_file_found_twice_is_one_candidate(tmp_path, sd1):
    """``<lyco:...>`` searches the LoRA folder and a ``LyCORIS`` folder beside it: with that folder a symlink to the
    LoRA folder (or a file symlinked into a subfolder) each file was found twice, so a unique name was "ambiguous"
    and an ambiguous one listed a file twice. Candidates are deduplicated by resolved path, in the order found."""
    from sdplugin_lora.apply import LycoHandler

    lora_dir = tmp_path / "models" / "Lora"
    solo = _lora(sd1, lora_dir, "solo.safetensors")
    first, second = _lora(sd1, lora_dir / "a", "twin.safetensors"), _lora(sd1, lora_dir / "b", "twin.safetensors")
    (tmp_path / "models" / "LyCORIS").symlink_to(lora_dir, target_is_directory=True)
    (lora_dir / "c").mkdir()
    (lora_dir / "c" / "twin.safetensors").symlink_to(first)  # the same file under another name
    handler = LycoHandler(lora_dir)
    assert handler.find("solo") == solo
    with pytest.raises(NetworkMismatchError) as info:
        handler.find("twin")
    assert str(info.value) == (
        f"lyco 'twin' is ambiguous: 2 LoRA files have that name ({first}, {second}); "
        "rename one or give the path of the one you mean"
    )


def test_one_file_under_two_spellings_resolve_keeps_apart_is_one_candidate(tmp_path, sd1):
    """On macOS's case-insensitive disk ``--lora-dir models/lycoris`` and the ``LyCORIS`` folder searched beside it
    are one folder, and ``resolve()`` keeps each spelling's case, so deduplicating by resolved path left each file
    twice ("ambiguous"). A hard link is the same situation on this disk: one file, two paths ``resolve()`` does not
    unify; the file's identity (device, inode) makes it one candidate."""
    import os

    from sdcore.generate.networks import _distinct_files
    from sdplugin_lora.apply import LoraHandler

    lora_dir = tmp_path / "Lora"
    first = _lora(sd1, lora_dir / "a", "twin.safetensors")
    (lora_dir / "b").mkdir()
    os.link(first, lora_dir / "b" / "twin.safetensors")
    assert (lora_dir / "b" / "twin.safetensors").resolve() != first.resolve()
    assert LoraHandler(lora_dir).find("twin") == first
    # paths that cannot be looked up keep their order and count once per spelling, without a traceback
    gone = tmp_path / "gone.safetensors"
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert _distinct_files([gone, first, tmp_path / "x" / ".." / "gone.safetensors", loop, loop]) == [
        gone,
        first,
        loop,
    ]


def test_lora_tag_finds_the_lycoris_folder_as_a1111_1_5_and_a_name_in_both_is_ambiguous(tmp_path, no_load, sd1):
    """A1111 1.5+ (extensions-builtin/Lora ``list_available_networks``) lists ``--lora-dir`` then
    ``--lyco-dir-backcompat`` (default ``models/LyCORIS``) for ``<lora:>`` and its alias ``<lyco:>``: both tags
    search ``models/Lora`` and ``models/LyCORIS`` here, and "not found" names both folders. A name in both folders
    is sdcore's ambiguity error (A1111 silently takes the LyCORIS file, the last it lists)."""
    from sdcore.generate.session import handlers_from_plugin_manager

    models = tmp_path / "models"
    mine = _lora(sd1, models / "Lora", "mine.safetensors", seed=1)
    old = _lora(sd1, models / "LyCORIS" / "sub", "oldstyle.safetensors", seed=2)
    handlers = handlers_from_plugin_manager(_pm(), models_dir=models)
    for tag in ("lora", "lyco"):
        handler = handlers[tag]
        assert isinstance(handler, PromptNetworkHandler)
        assert handler.search_folders() == [models / "Lora", models / "LyCORIS"]
        assert handler.find("oldstyle") == old and handler.find("mine") == mine
    result = _sdcore(tmp_path, "castle <lora:gone:1>", "--models-dir", str(models))
    assert _error(result) == (
        f"lora 'gone' not found in {(models / 'Lora').absolute()} and {(models / 'LyCORIS').absolute()} and its "
        "subfolders; available: mine, oldstyle; point --lora-dir at the folder with your LoRA files (the default "
        "is the Lora folder of --models-dir, as in A1111)"
    )
    twin = _lora(sd1, models / "LyCORIS", "mine.safetensors", seed=3)
    result = _sdcore(tmp_path, "castle <lora:mine:1>", "--models-dir", str(models))
    assert _error(result) == (
        f"lora 'mine' is ambiguous: 2 LoRA files have that name ({mine}, {twin}); "
        "rename one or give the path of the one you mean"
    )
    # ComfyUI's models/loras stays searched, after them
    comfy = _lora(sd1, models / "loras", "comfy.safetensors", seed=4)
    handler = handlers_from_plugin_manager(_pm(), models_dir=models)["lora"]
    assert isinstance(handler, PromptNetworkHandler)
    assert handler.search_folders() == [models / "Lora", models / "LyCORIS", models / "loras"]
    assert handler.find("comfy") == comfy
