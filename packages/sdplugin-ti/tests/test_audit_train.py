"""What a kohya/A1111 user met in ``sdcore train ti`` (the newcomer audit)."""

from __future__ import annotations

from sdcore.testing.contract import contract_options
from sdcore.train.preflight import run_preflight
from sdplugin_ti.method import TIMethod

TI_OPTIONS = {"name": "mychar", "vectors": 2, "template": "subject_filewords", "lr": 5e-2}


def _notes(tmp_path, **overrides):
    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, **overrides})
    return [n for n in run_preflight(TIMethod(options), options, plan=False).notes if "answers to" in n]


def test_an_output_file_whose_stem_is_not_the_name_says_which_word_the_prompt_takes(tmp_path):
    """kohya's ``--token_string mychar --output_dir out`` (output_name defaults to "last") wrote ``out/last.pt``
    without a word: A1111, ComfyUI and ``sdcore generate`` load it as the word ``last``, though ``--help`` said
    ``--name`` is "the word used in prompts and the output file stem"."""
    last = tmp_path / "out" / "last.pt"
    assert _notes(tmp_path, output=str(last)) == [
        f"{last} answers to 'last' in prompts (A1111, ComfyUI and sdcore generate take the file name), not to "
        f"--name 'mychar': rename the file, or give --output {tmp_path / 'out' / 'mychar.pt'}"
    ]
    assert _notes(tmp_path, output=str(tmp_path / "out" / "mychar.pt")) == []
    assert _notes(tmp_path, output=str(tmp_path / "out" / "MyChar.pt")) == []  # prompt words match in any case
    assert _notes(tmp_path, output=str(tmp_path / "out")) == []  # a folder: <name>.pt


def test_a_name_that_is_a_path_is_one_problem_not_a_traceback(tmp_path):
    """``--name out/mychar`` (a path) ended the pre-flight in pathlib's ``ValueError: Invalid name`` from the
    note above; validate's problem, naming the letters a name may use, is what is said."""
    for name in ("out/mychar", str(tmp_path / "with space" / "x.txt")):
        options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, "name": name, "output": str(tmp_path / "out")})
        report = run_preflight(TIMethod(options), options, plan=False)
        assert report.problems == [f"--name {name!r}: use letters, digits, '.', '_', '-' and spaces only"]


def test_a_resume_with_another_template_or_schedule_warns(tmp_path, capsys):
    """TI's template and A1111 rate schedule change the prompts and the rates: a ``--resume`` that changed them
    continued without a word, where one changing the runtime's own --lr or --lr-scheduler warns."""
    import dataclasses

    from sdcore.models.tiny import create_tiny_bundle
    from sdcore.train.loop import train

    options = contract_options(TIMethod, tmp_path, {**TI_OPTIONS, "max_steps": 2, "progress": True})
    train(TIMethod(options), bundle=create_tiny_bundle("sd1"))
    capsys.readouterr()
    same = dataclasses.replace(options, resume="latest", max_steps=3)
    train(TIMethod(same), bundle=create_tiny_bundle("sd1"))
    assert "resuming with changed" not in capsys.readouterr().err
    changed = dataclasses.replace(same, max_steps=4, template="style_filewords", lr_schedule="5e-3:10, 1e-3")
    train(TIMethod(changed), bundle=create_tiny_bundle("sd1"))
    said = capsys.readouterr().err
    assert ("warning: resuming with changed template ('subject_filewords' -> 'style_filewords'), lr_schedule ("
            in said)  # fmt: skip
    assert said.count("resuming with changed") == 1
