"""``sdcore lora merge|extract|resize|convert`` and an output that exists: ``sdcore generate``'s rule.

They replaced an existing output in silence, even when ``-o`` named one of their inputs (a LoRA resized
onto itself was lost if anything went wrong). Now an existing output is an error found before any model
or file is read, unless ``--overwrite``; an output that is an input is refused even with it.
"""

from __future__ import annotations

from lora_testutil import refusal as _refused
from lora_testutil import run_lora_command as _run
from lora_testutil import saved_lora as _lora
from sdplugin_lora.tools import lora_info


def test_existing_output_is_an_error_before_any_work_unless_overwrite(tmp_path):
    source = _lora(tmp_path)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an earlier result")
    # a --base-model that cannot load shows that nothing was read before the refusal
    result = _run("resize", source, "-o", out, "--rank", "2", "--base-model", tmp_path / "no-such-model")
    assert _refused(result) == f"{out} already exists; pass --overwrite to replace it, or choose another -o"
    assert out.read_bytes() == b"an earlier result"
    for args in (
        ("extract", "tiny:sd1", tmp_path / "no-such-model", "-o", out, "--rank", "2"),
        ("merge", source, "-o", out),
        ("merge", source, "-o", out, "--model", tmp_path / "no-such-model"),
        ("convert", source, "-o", out, "--to", "comfyui"),
    ):
        result = _run(*args)
        assert "already exists; pass --overwrite" in _refused(result), args
        assert out.read_bytes() == b"an earlier result"
    result = _run("resize", source, "-o", out, "--rank", "2", "--overwrite")
    assert result.exit_code == 0, result.output
    assert set(lora_info(out)["ranks"]) == {2}
    # a new file needs no flag
    fresh = tmp_path / "fresh.safetensors"
    assert _run("merge", f"{source}:0.5", "-o", fresh).exit_code == 0 and fresh.exists()


def test_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path):
    source = _lora(tmp_path)
    other = _lora(tmp_path, "other.safetensors", rank=2)
    before = source.read_bytes()
    spelled = tmp_path / "sub" / ".." / source.name  # the same file under another spelling
    (tmp_path / "sub").mkdir()
    for args in (
        ("resize", source, "-o", spelled, "--rank", "2"),
        ("merge", other, f"{source}:0.5", "-o", source),
        ("convert", source, "-o", source, "--to", "comfyui"),
    ):
        result = _run(*args, "--overwrite")
        message = _refused(result)
        assert "is the input" in message and "cannot replace a file it is made from" in message, args
        assert source.read_bytes() == before
    # every problem at once: a ratio that is no number and the output
    result = _run("merge", f"{other}:half", "-o", other)
    assert "the ratio 'half' is not a number" in _refused(result) and "is the input" in _refused(result)
    assert result.exception.problems[-1].startswith(f"-o {other} is the input {other}")


def test_an_output_with_no_file_name_or_a_folder_is_refused_naming_the_fix(tmp_path, monkeypatch):
    """``-o ""`` (an unset shell variable) was a traceback (``PosixPath('.') has an empty name``); a folder as
    the output (merge's -o takes one) was told to pass --overwrite, which can not put a file there."""
    source = _lora(tmp_path)
    folder = tmp_path / "results.safetensors"  # a folder under the very name
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    for output in ("", " "):
        for args in (
            ("resize", source, "-o", output, "--rank", "2"),
            ("merge", source, "-o", output),
            ("convert", source, "-o", output, "--to", "comfyui"),
            ("extract", "tiny:sd1", tmp_path / "no-such-model", "-o", output),
        ):
            result = _run(*args)
            assert (
                _refused(result)
                == f"-o {output!r}: no file name; give the LoRA file to write, e.g. -o my_lora.safetensors"
            ), args
    message = _refused(_run("merge", source, "-o", folder, "--overwrite"))
    assert message == f"-o {str(folder)!r} is a folder: name the file to write (a path inside it)"


def test_a_junk_lora_or_model_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """``lora merge junk.bin --model M``, ``lora resize junk.bin --base-model M`` and ``lora extract BASE junk``
    loaded the model first and found the junk after it; the files are now read (LoRAs) or their headers checked
    (models) first, one line for each problem, all at once."""
    import sdplugin_lora.commands as commands

    loaded = []
    monkeypatch.setattr(commands, "_load_model", lambda source: loaded.append(source) or 1 / 0)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(200, 256)) * 40)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    out = tmp_path / "out.safetensors"
    junk_line = f"{junk}: not a torch file (no zip and no pickle: byte 0xc8 is no pickle instruction)"
    result = _run("merge", junk, empty, "--model", "tiny:sd1", "-o", out)
    assert _refused(result) == f"{junk_line}; {empty}: empty file (0 bytes), not a safetensors file"
    assert _refused(_run("resize", junk, "--rank", "2", "--base-model", "tiny:sd1", "-o", out)) == junk_line
    assert _refused(_run("merge", junk, "--mode", "svd", "--base-model", "tiny:sd1", "-o", out)) == junk_line
    result = _run("extract", "tiny:sd1", empty, "-o", out, "--rank", "2")
    assert _refused(result) == f"{empty}: empty file (0 bytes), not a safetensors file"
    assert loaded == [] and not out.exists()
