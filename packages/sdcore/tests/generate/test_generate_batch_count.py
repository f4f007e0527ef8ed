"""``sdcore generate --n-iter`` (A1111's batch count) and ``--from-file`` (A1111's "Prompts from file or
textbox", kohya's ``gen_img.py --from_file``) on tiny:sd1, and the line reader itself."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import sdcore
from click.testing import CliRunner
from PIL import Image
from sdcore.builtin import generate_command
from sdcore.builtin.generate_command import generate
from sdcore.generate.pnginfo import parse_parameters
from sdcore.generate.prompt_file import A1111, KOHYA, PLAIN, job_params, line_seeds, read_prompt_file

_BASE = ["-m", "tiny:sd1", "--steps", "1", "--device", "cpu"]


def _invoke(args, **kwargs):
    from sdcore.plugins import get_plugin_manager

    pm = get_plugin_manager(builtins=False, entrypoints=False)
    return CliRunner().invoke(generate, args, obj=types.SimpleNamespace(pm=pm), catch_exceptions=True, **kwargs)


def _read(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy(), image.info["parameters"], image.size


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(generate_command, "_load_bundle", lambda *a, **k: pytest.fail("the model must not load"))


@pytest.mark.parametrize("variation", [[], ["--subseed", "50", "--subseed-strength", "0.3", "--sampler", "euler_a"]])
def test_batch_count_makes_the_images_of_one_big_batch(tmp_path, variation):
    """A1111: image i of n_iter x batch_size has seed + i (all the seed with a variation strength, subseed + i);
    two batches of 2 are then the four images of one batch of 4, pixel for pixel, infotext for infotext."""
    result = _invoke(
        [*_BASE, "cat", "--seed", "7", "--n-iter", "2", "--batch", "2", *variation, "-o", str(tmp_path / "a.png")]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / f"a-{i}.png") for i in range(4)]
    result = _invoke([*_BASE, "cat", "--seed", "7", "--batch", "4", *variation, "-o", str(tmp_path / "b.png")])
    assert result.exit_code == 0, result.output
    for index in range(4):
        pixels, text, _ = _read(tmp_path / f"a-{index}.png")
        other, other_text, _ = _read(tmp_path / f"b-{index}.png")
        assert text == other_text
        params = parse_parameters(text)
        if variation:
            assert params.seed == 7 and params.extra["Variation seed"] == str(50 + index)
        else:
            assert params.seed == 7 + index and "Variation seed" not in params.extra
        assert np.array_equal(pixels, other)
    assert not (tmp_path / "a-4.png").exists()


def test_batch_count_alias_and_a_random_seed_shared_by_the_batches(tmp_path):
    result = _invoke([*_BASE, "cat", "--batch-count", "3", "-o", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    seeds = [parse_parameters(_read(tmp_path / f"r-{i}.png")[1]).seed for i in range(3)]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]  # the -1 is drawn once for the whole run


def test_from_file_lines_of_every_syntax(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\n"
        "a red cat\n"
        "\n"
        '--prompt "a blue" dog --negative_prompt ugly --steps 2 --seed 11 --width 64 --height 48 --batch_size 2\n'
        "a green frog --n blurry --w 48 --h 64 --d 5 --s 3 --l 5 --am 0.5\n",
        encoding="utf-8",
    )
    args = [*_BASE, "masterpiece", "-n", "lowres", "--from-file", str(prompts), "--seed", "100", "--n-iter", "2"]
    result = _invoke([*args, "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / f"o-{i}.png") for i in range(8)]
    assert "note: --from-file " + str(prompts) + " line 5: --am not used" in result.stderr
    seen = []
    for index in range(8):
        _, text, size = _read(tmp_path / f"o-{index}.png")
        params = parse_parameters(text)
        seen.append((size, params.prompt, params.negative_prompt, params.steps, params.seed, params.cfg))
    assert seen == [
        # a plain line: the command line's settings, PROMPT after the line's (A1111's "start")
        ((64, 64), "a red cat masterpiece", "lowres", 1, 100, 7.0),
        ((64, 64), "a red cat masterpiece", "lowres", 1, 101, 7.0),
        # A1111's tags: --prompt takes the words up to the next option; batch 2 x the command line's n_iter 2
        *[((64, 48), "a blue dog masterpiece", "ugly lowres", 2, 11 + i, 7.0) for i in range(4)],
        # kohya's gen_img options
        ((48, 64), "a green frog masterpiece", "blurry lowres", 3, 5, 5.0),
        ((48, 64), "a green frog masterpiece", "blurry lowres", 3, 6, 5.0),
    ]


def test_from_stdin_prompts_at_the_end_and_iterated_seeds(tmp_path):
    text = "a cat\n--prompt a dog --seed 3\na frog\n"
    args = [*_BASE, "best", "--from-file", "-", "--prompt-position", "end", "--iterate-seed", "--seed", "10"]
    result = _invoke([*args, "--batch", "2", "-o", str(tmp_path / "s.png")], input=text)
    assert result.exit_code == 0, result.output
    got = [parse_parameters(_read(tmp_path / f"s-{i}.png")[1]) for i in range(6)]
    assert [p.prompt for p in got] == ["best a cat"] * 2 + ["best a dog"] * 2 + ["best a frog"] * 2
    # A1111: the seed moves on by the main batch size x batch count every line, whatever a line sets
    assert [p.seed for p in got] == [10, 11, 3, 4, 14, 15]


def test_kohya_seed_list_gives_the_line_images_their_seeds(tmp_path):
    """gen_img.py's ``--d 5,9``: image i of the line takes seed i (the line makes --batch x --n-iter images, as
    kohya's --images_per_prompt); past the list sdcore goes on with last + 1, seeds past the images are unused;
    an image is the one ``--seed`` renders alone."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --d 5,9\na dog --d 3,4,8\n", encoding="utf-8")
    result = _invoke([*_BASE, "--from-file", str(prompts), "--batch", "3", "-o", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    got = [parse_parameters(_read(tmp_path / f"s-{i}.png")[1]) for i in range(6)]
    assert [(p.prompt, p.seed) for p in got] == [("a cat", 5), ("a cat", 9), ("a cat", 10), ("a dog", 3),
                                                 ("a dog", 4), ("a dog", 8)]  # fmt: skip
    assert "line 1: --d 5,9: the line makes 3 images, so the ones past the list take seeds 10" in result.stderr
    assert "line 2:" not in result.stderr
    result = _invoke([*_BASE, "a cat", "--seed", "9", "-o", str(tmp_path / "alone.png")])
    assert result.exit_code == 0, result.output
    alone, listed = _read(tmp_path / "alone.png")[0], _read(tmp_path / "s-1.png")[0]  # (batched float sums may
    assert np.abs(alone.astype(int) - listed.astype(int)).max() <= 2  # differ in the last bit)
    prompts.write_text("a cat --d 5,9,11\n", encoding="utf-8")
    result = _invoke([*_BASE, "--from-file", str(prompts), "-o", str(tmp_path / "one.png")])
    assert result.exit_code == 0, result.output
    assert parse_parameters(_read(tmp_path / "one.png")[1]).seed == 5 and not (tmp_path / "one-1.png").exists()
    assert "seeds 9, 11 are not used (kohya's rule); --n-iter 3 renders one image per seed" in result.stderr


def test_a_seed_list_with_a_random_variation_seed_is_a1111s(tmp_path):
    """A seed list (``--d 5,9,11``) with ``--subseed -1 --subseed-strength``: A1111 draws the -1 once for the line's
    job and gives image i the list's seed i and variation seed drawn + i (processing.py: ``all_subseeds =
    subseed + x``), written in each image's parameters; a second line draws its own. A given subseed is subseed
    + i the same way."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --d 5,9,11\na dog --d 3\n", encoding="utf-8")
    variation = ["--subseed", "-1", "--subseed-strength", "0.5", "--batch", "3"]
    result = _invoke([*_BASE, "--from-file", str(prompts), *variation, "-o", str(tmp_path / "v.png")])
    assert result.exit_code == 0, result.output
    got = [parse_parameters(_read(tmp_path / f"v-{i}.png")[1]) for i in range(6)]
    assert [p.seed for p in got] == [5, 9, 11, 3, 3, 3]  # a single --d: all the seed, with a strength (A1111)
    subseeds = [int(p.extra["Variation seed"]) for p in got]
    assert all(p.extra["Variation seed strength"] == "0.5" for p in got)
    assert subseeds[:3] == [subseeds[0] + i for i in range(3)], subseeds
    assert subseeds[3:] == [subseeds[3] + i for i in range(3)], subseeds
    prompts.write_text("a cat --d 5,9\n", encoding="utf-8")
    variation[1] = "40"
    result = _invoke([*_BASE, "--from-file", str(prompts), *variation, "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 0, result.output
    got = [parse_parameters(_read(tmp_path / f"g-{i}.png")[1]) for i in range(3)]
    assert [(p.seed, p.extra["Variation seed"]) for p in got] == [(5, "40"), (9, "41"), (10, "42")]


def test_every_line_problem_at_once_before_the_model_loads(tmp_path, no_model_load):
    prompts = tmp_path / "bad.txt"
    prompts.write_text(
        "fine prompt\n"
        "--prompt cat --bogus 1\n"
        "--prompt cat --steps many\n"
        "a dog --w wide\n"
        "--sd_model other.safetensors --prompt cat\n"
        "--prompt cat --sampler_name nope\n"
        "--prompt cat --width 64\n"
        '--prompt "unclosed\n'
        "--steps 3\n"
        "--prompt cat --n_iter 1000000000\n"
        "a bird --d 1,x,3\n",
        encoding="utf-8",
    )
    result = _invoke([*_BASE, "--from-file", str(prompts), "-o", str(tmp_path / "o.png")])
    assert isinstance(result.exception, sdcore.ConfigError) and result.exception.exit_code == 2
    message = str(result.exception)
    where = f"--from-file {prompts}"
    for expected in (
        f"{where} line 2: unknown option --bogus (A1111's tags that sdcore takes: --prompt,",
        f"{where} line 3: --steps needs an integer, got 'many'",
        f"{where} line 4: --w needs a number, got 'wide'",
        f"{where} line 5: --sd_model is not available (sdcore generate loads one model for every line",
        f"{where} line 6: unknown sampler",
        f"{where} line 7: --width/--height given by half; give both, or --size for the other",
        f"{where} line 8: No closing quotation",
        f"{where} line 9: no prompt (the line gives none, and there is no PROMPT on the command line)",
        f"{where} line 10: n iter 1000000000 is not in 1-1000",
        f"{where} line 11: --d 1,x,3: every seed of a list is a whole number 0 or more, got 'x'",
    ):
        assert expected in message, (expected, message)
    assert "line 1:" not in message
    assert not list(tmp_path.glob("o*.png"))


def test_refusals_and_outputs_checked_before_the_model_loads(tmp_path, no_model_load):
    out = tmp_path / "o.png"
    plot = ["--x-type", "Steps", "--x-values", "1,2"]
    result = _invoke([*_BASE, "cat", "--n-iter", "2", *plot, "-o", str(out)])
    assert "an X/Y/Z plot makes one image per cell; drop --n-iter" in str(result.exception)
    result = _invoke([*_BASE, "cat", "--n-iter", "1001", "-o", str(out)])  # a typo never builds a billion paths
    assert result.exit_code == 2 and "1001 is not in the range 1<=x<=1000" in result.output
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n--prompt a dog --batch_size 3\n", encoding="utf-8")
    result = _invoke([*_BASE, "--from-file", str(prompts), *plot, "-o", str(out)])
    assert "--from-file and the X/Y/Z plot are two A1111 scripts" in str(result.exception)
    result = _invoke([*_BASE, "cat", "--iterate-seed", "--prompt-position", "end", "-o", str(out)])
    assert "--prompt-position, --iterate-seed set how --from-file's lines run" in str(result.exception)
    # one numbered sequence over every line's images (1 + 3): the fourth exists already
    (tmp_path / "o-3.png").write_bytes(b"earlier")
    result = _invoke([*_BASE, "--from-file", str(prompts), "-o", str(out)])
    assert f"{tmp_path / 'o-3.png'} already exists; pass --overwrite" in str(result.exception)
    assert (tmp_path / "o-3.png").read_bytes() == b"earlier"
    result = _invoke([*_BASE, "--from-file", str(tmp_path / "missing.txt"), "-o", str(out)])
    assert f"--from-file {tmp_path / 'missing.txt'}: cannot read prompt file: " in str(result.exception)


def test_reader_tells_the_syntaxes_apart(tmp_path):
    text = 'plain words\n--prompt "a b" c --cfg_scale 4.5 --tiling true --styles "one, two"\nx --n y --t 0.4\n'
    jobs, problems = read_prompt_file("p.txt", text)
    assert problems == []
    assert [(job.number, job.syntax) for job in jobs] == [(1, PLAIN), (2, A1111), (3, KOHYA)]
    assert jobs[0].values == {"prompt": "plain words"}
    assert jobs[1].values == {"prompt": "a b c", "cfg": 4.5, "tiling": True, "styles": ("one", "two")}
    assert jobs[2].values == {"prompt": "x", "negative": "y", "strength": 0.4}
    (job,), problems = read_prompt_file("p.txt", "a bird --d\n")  # a bare --d is noted, as before seed lists
    assert problems == [] and job.values == {"prompt": "a bird"} and "--d not used" in job.notes[0]
    # harmless A1111 tags are a note; restore_faces false changes nothing, true is refused
    jobs, problems = read_prompt_file("p.txt", "--prompt a --do_not_save_grid true --restore_faces false\n")
    assert problems == [] and len(jobs[0].notes) == 2
    _, problems = read_prompt_file("p.txt", "--prompt a --restore_faces true\n")
    assert problems == ["--from-file p.txt line 1: --restore_faces is not available (sdcore has no face restoration)"]
    _, problems = read_prompt_file("p.txt", "# only a comment\n\n")
    assert problems == ["--from-file p.txt: no prompts in it (empty lines and # comments only)"]


def test_reader_takes_kohya_json_prompt_files(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "a cat", "width": 64, "height": 48, "seed": 3, "scale": 6}]))
    jobs, problems = read_prompt_file(str(path))
    assert problems == [] and jobs[0].values == {"prompt": "a cat", "width": 64, "height": 48, "seed": 3, "cfg": 6.0}


def test_job_params_joins_prompts_and_half_sizes():
    params = {"prompt": "base", "negative": "neg", "size": (64, 32), "seed_resize_from": None, "seed": 1}
    (job,), _ = read_prompt_file("p.txt", "--prompt cat --negative_prompt bad --height 48 --seed_resize_from_w 64\n")
    cell, problems = job_params(params, job, "end")
    assert (cell["prompt"], cell["negative"], cell["size"]) == ("base cat", "neg bad", (64, 48))
    assert problems == ["line 1: --seed_resize_from_w/_h given by half; give both, or --seed-resize-from for the other"]


def test_line_seeds_follow_a1111s_checkboxes():
    draw = iter([900, 901]).__next__
    assert line_seeds(5, 3, 4, iterate=False, same=False, draw=draw) == [5, 5, 5]
    assert line_seeds(-1, 3, 4, iterate=False, same=False, draw=draw) == [-1, -1, -1]  # each line draws later
    assert line_seeds(5, 3, 4, iterate=True, same=False, draw=draw) == [5, 9, 13]
    assert line_seeds(-1, 3, 4, iterate=True, same=False, draw=draw) == [900, 904, 908]
    assert line_seeds(-1, 2, 4, iterate=False, same=True, draw=draw) == [901, 901]


def test_lines_compose_with_from_png_and_styles(tmp_path):
    source = tmp_path / "source.png"
    result = _invoke([*_BASE, "castle", "--steps", "2", "--cfg", "5", "--seed", "7", "-o", str(source)])
    assert result.exit_code == 0, result.output
    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nmine,"{prompt}, oil painting",blurry\n', encoding="utf-8")
    prompts = tmp_path / "p.txt"
    prompts.write_text("--prompt dog --seed 3\n--prompt frog --styles mine --steps 1\n", encoding="utf-8")
    args = [
        "-m",
        "tiny:sd1",
        "--device",
        "cpu",
        "--from-png",
        str(source),
        "--from-file",
        str(prompts),
        "--styles-file",
        str(styles),
    ]
    result = _invoke([*args, "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    first, second = (parse_parameters(_read(tmp_path / f"o-{i}.png")[1]) for i in range(2))
    # the PNG's settings under the lines' (its prompt is the PROMPT the lines join, as A1111's pasted prompt)
    assert (first.prompt, first.steps, first.cfg, first.seed) == ("dog castle", 2, 5.0, 3)
    assert (second.prompt, second.negative_prompt, second.steps, second.seed) == (
        "frog castle, oil painting",
        "blurry",
        1,
        7,
    )


def test_a_lines_network_tag_is_checked_before_the_model_loads(tmp_path, no_model_load):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog <lora:missing:1> --n lowres\n", encoding="utf-8")
    result = _invoke([*_BASE, "--from-file", str(prompts), "-o", str(tmp_path / "o.png")])
    assert isinstance(result.exception, sdcore.ConfigError) and result.exception.exit_code == 2
    assert "<lora:missing:1>" in str(result.exception)


def test_reader_decodes_as_the_prompt_files_of_training(tmp_path):
    """Notepad's UTF-8 BOM and UTF-16 read as written (a BOM left on made the first A1111 line a plain prompt
    ``\\ufeff--prompt ...``); a Windows code page is a problem naming the byte, never replacement characters."""
    line = "--prompt a café --steps 3\n"
    for name, data in (("bom.txt", b"\xef\xbb\xbf" + line.encode()), ("u16.txt", line.encode("utf-16"))):
        (tmp_path / name).write_bytes(data)
        jobs, problems = read_prompt_file(str(tmp_path / name))
        assert problems == [] and [(job.syntax, job.values) for job in jobs] == [
            (A1111, {"prompt": "a café", "steps": 3})
        ]
    jobs, _ = read_prompt_file("-", "\ufeff" + line)  # piped from PowerShell
    assert jobs[0].values == {"prompt": "a café", "steps": 3}
    (tmp_path / "cp.txt").write_bytes(line.encode("cp1252"))
    jobs, problems = read_prompt_file(str(tmp_path / "cp.txt"))
    assert jobs == [] and problems == [
        f"--from-file {tmp_path / 'cp.txt'}: prompt file is not UTF-8 (byte 0xE9 at 14, 'é' in Windows-1252: saved in "
        "a Windows code page?): save it as UTF-8 (Notepad: Save as, Encoding UTF-8)"
    ]


def test_a_json_entrys_problem_names_the_entry(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y", "width": 64}]), encoding="utf-8")
    jobs, _ = read_prompt_file(str(path))
    params = {"prompt": None, "negative": "", "size": None, "seed_resize_from": None}
    assert job_params(params, jobs[1], "start")[1] == [
        "prompt 2: --width/--height given by half; give both, or --size for the other"
    ]


def test_a_seed_list_in_a_json_prompt_file_is_one_problem_naming_the_entry(tmp_path):
    """gen_img.py's ``--d 1,2,3`` list is a text line's; kohya's JSON/TOML prompt files take one seed."""
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "x", "seed": [4, 5]}]), encoding="utf-8")
    jobs, problems = read_prompt_file(str(path))
    assert jobs == [] and len(problems) == 1
    assert problems[0].startswith(f"--from-file {path} prompt 1: 'seed' [4, 5]: a list of seeds is not taken")
    assert problems[0].endswith("give one: seed = 4")


def test_kept_letters_leave_the_training_samples_parser_as_it_was():
    """``keep`` is generate's alone: without it ``--t`` stays an ignored option of a sample prompt."""
    from sdcore.train.sample_prompts import parse_prompt_line

    plain = parse_prompt_line("a dog --T 0.5 --am 1 --d 3")
    assert (plain.ignored, plain.kept, plain.seed) == (("--T", "--am"), (), 3)
    kept = parse_prompt_line("a dog --T 0.5 --am 1 --d 3", keep=("t",))
    assert (kept.ignored, kept.kept, kept.seed) == (("--am",), (("t", "0.5"),), 3)


@pytest.mark.parametrize("same", [False, True])
def test_a_random_seed_per_line_or_once_for_all(tmp_path, same):
    """A1111: a -1 is fixed in each line's process_images (its batches share it: seed + i); "Use same random
    seed for all lines" fixes it once before the first line."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    flags = ["--same-seed"] if same else []
    result = _invoke([*_BASE, "--from-file", str(prompts), "--n-iter", "2", *flags, "-o", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    seeds = [parse_parameters(_read(tmp_path / f"o-{i}.png")[1]).seed for i in range(4)]
    assert seeds[1] == seeds[0] + 1 and seeds[3] == seeds[2] + 1
    assert (seeds[2] == seeds[0]) is same  # two independent draws of 2**32 differ but once in 4 billion
