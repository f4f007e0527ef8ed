"""kohya's sample-prompt syntax: options never end up in the prompt text."""

import json

import pytest
from sdcore.errors import ConfigError
from sdcore.train.sample_prompts import (
    SamplePrompt,
    generation_calls,
    parse_prompt_file,
    parse_prompt_line,
    read_sample_prompts,
    sampler_name,
)


def test_line_with_every_kohya_option():
    p = parse_prompt_line(
        "masterpiece, 1girl, red hair --n lowres, bad hands --w 512 --h 768 --s 28 --d 42 --l 7.5 --ss k_euler_a"
    )
    assert p == SamplePrompt(
        prompt="masterpiece, 1girl, red hair",
        negative="lowres, bad hands",
        width=512,
        height=768,
        steps=28,
        seed=42,
        cfg=7.5,
        sampler="euler_a",
    )


def test_options_in_any_order_and_case_and_unknown_ones_left_out():
    p = parse_prompt_line("a dog --D 7 --ctr 0.5 --N ugly --S 5")
    assert (p.prompt, p.seed, p.negative, p.steps, p.ignored) == ("a dog", 7, "ugly", 5, ("--ctr",))
    assert parse_prompt_line("plain prompt, no options") == SamplePrompt(prompt="plain prompt, no options")
    # a double dash inside a word is not an option (kohya splits at " --")
    assert parse_prompt_line("a--b").prompt == "a--b"


def test_kohya_sampler_names():
    assert sampler_name("dpmsolver++") == "dpm++2m"
    assert sampler_name("ddim") == "ddim"
    assert sampler_name("k_euler") == "euler"
    assert sampler_name("euler_a") == "euler_a"
    with pytest.raises(ConfigError, match=r"k_dpm_2_a.*not available"):
        sampler_name("k_dpm_2_a")


@pytest.mark.parametrize(
    ("line", "message"),
    [("a cat --w wide", "--w needs a number"), ("a cat --s 0", "--s must be positive"), (" --n bad", "no prompt")],
)
def test_bad_options_name_the_line(line, message):
    with pytest.raises(ConfigError, match=message):
        parse_prompt_file(f"# comment\n{line}\n", ".txt", "p.txt")
    with pytest.raises(ConfigError, match="line 2"):
        parse_prompt_file(f"# comment\n{line}\n", ".txt", "p.txt")


def test_txt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# kohya prompt file\n\na red thing --n blurry\n  # indented comment\na blue thing --w 64\n")
    prompts = read_sample_prompts(str(path))
    assert [(p.prompt, p.negative, p.width) for p in prompts] == [
        ("a red thing", "blurry", None),
        ("a blue thing", "", 64),
    ]


def test_json_and_toml_prompt_files(tmp_path):
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "a cat", "negative_prompt": "dog", "width": 64, "scale": 5, "seed": 3}]))
    assert read_sample_prompts(str(j)) == [SamplePrompt(prompt="a cat", negative="dog", width=64, cfg=5.0, seed=3)]
    t = tmp_path / "p.toml"
    t.write_text(
        '[prompt]\nnegative_prompt = "lowres"\nwidth = 64\nsample_steps = 4\n\n'
        '[[prompt.subset]]\nprompt = "a cat"\n\n[[prompt.subset]]\nprompt = "a dog"\nwidth = 128\n'
    )
    prompts = read_sample_prompts(str(t))
    assert [(p.prompt, p.negative, p.width, p.steps) for p in prompts] == [
        ("a cat", "lowres", 64, 4),
        ("a dog", "lowres", 128, 4),
    ]


def test_a_seed_list_in_a_json_or_toml_prompt_file_is_refused_by_name(tmp_path):
    """``"seed": [1, 2, 3]`` (gen_img.py's ``--d`` list written in kohya's JSON/TOML sample prompts, where kohya
    takes one seed) was "--seed needs a number"; a seed 0 or below was "--seed must be positive" (a line's ``--d 0``
    is taken), and a key was named by sdcore's word (``--steps`` for ``sample_steps``)."""
    for text, suffix, where in (
        (json.dumps([{"prompt": "a", "seed": [1, 2, 3]}]), ".json", "f prompt 1"),
        ('[prompt]\nseed = [1, 2]\n[[prompt.subset]]\nprompt = "a"\n', ".toml", "f subset 1"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_prompt_file(text, suffix, "f")
        seeds = "[1, 2, 3]" if suffix == ".json" else "[1, 2]"
        assert str(caught.value) == (
            f"{where}: 'seed' {seeds}: a list of seeds is not taken (kohya's JSON/TOML sample prompts take one seed; "
            "sdcore gives a prompt's image i the seed + i, as A1111); give one: seed = 1"
        )
    entries = [{"prompt": "a", "seed": 0}, {"prompt": "b", "seed": -3}]
    assert [p.seed for p in parse_prompt_file(json.dumps(entries), ".json", "f")] == [0, -3]
    with pytest.raises(ConfigError, match=r"^f prompt 1: 'sample_steps' must be positive, got 0$"):
        parse_prompt_file(json.dumps([{"prompt": "a", "sample_steps": 0}]), ".json", "f")
    with pytest.raises(ConfigError, match=r"^f prompt 1: 'scale' needs a number, got 'high'$"):
        parse_prompt_file(json.dumps([{"prompt": "a", "scale": "high"}]), ".json", "f")


def test_single_prompt_text_and_missing_file(tmp_path):
    assert read_sample_prompts("a lone prompt --s 3") == [SamplePrompt(prompt="a lone prompt", steps=3)]
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        read_sample_prompts(str(tmp_path / "missing.txt"))


def test_generation_calls_keep_seeds_per_line():
    prompts = [
        SamplePrompt("a"),
        SamplePrompt("b"),
        SamplePrompt("c", seed=99),
        SamplePrompt("d"),
        SamplePrompt("e", width=64),
    ]
    calls = generation_calls(prompts, seed=10)
    assert [([p.prompt for p in group], seed) for group, seed in calls] == [
        (["a", "b"], 10),
        (["c"], 99),
        (["d"], 13),
        (["e"], 14),
    ]


def test_generation_arguments_line_options_win_over_method_extras_and_defaults():
    from sdcore.train.sample_prompts import generation_arguments

    defaults = {"steps": 20, "width": 512, "height": 512, "sampler": "euler_a"}
    extra = {"negative_prompt": "emb-neg", "cfg": 3.0, "networks": "session"}
    plain = generation_arguments([SamplePrompt("a")], defaults, extra)
    assert plain == {**defaults, "negative_prompt": "emb-neg", "cfg": 3.0, "networks": "session"}
    line = generation_arguments([SamplePrompt("a", negative="ugly", cfg=6.0, steps=4, width=64)], defaults, extra)
    assert (line["negative_prompt"], line["cfg"], line["steps"], line["width"], line["height"]) == (
        ["ugly"],
        6.0,
        4,
        64,
        512,
    )
    assert generation_arguments([SamplePrompt("a"), SamplePrompt("b")], defaults, {})["negative_prompt"] == ["", ""]


def test_flux_lines_g_is_the_embedded_guidance_l_the_true_cfg_a_negative_needs():
    """kohya's FLUX.1 samples (since July 2025): --g embedded guidance, --l true CFG; --n only with --l > 1."""
    from sdcore.train.sample_prompts import dropped_negatives, generation_arguments

    plain, cfg = parse_prompt_line("a ring --n blurry --g 4"), parse_prompt_line("a ring --n blurry --l 2.5 --g 2")
    assert (plain.guidance, plain.cfg, plain.negative) == (4.0, None, "blurry")
    defaults = {"steps": 4, "width": 64, "height": 64, "sampler": "euler", "cfg": 3.5}
    flux = generation_arguments([plain], defaults, {}, distilled=True)
    assert flux["cfg"] == 4.0 and flux["negative_prompt"] == [""] and flux.get("true_cfg_scale", 1.0) == 1.0
    flux = generation_arguments([cfg], defaults, {}, distilled=True)
    assert flux["cfg"] == 2.0 and flux["true_cfg_scale"] == 2.5 and flux["negative_prompt"] == ["blurry"]
    assert generation_arguments([parse_prompt_line("a ring")], defaults, {}, distilled=True)["cfg"] == 3.5
    assert dropped_negatives([plain, cfg, parse_prompt_line("a ring")]) == 1
    # SD families: --l is CFG, --g has no meaning (warned about when rendering), negatives always count
    sd = generation_arguments([cfg], {**defaults, "cfg": 7.0}, {})
    assert sd["cfg"] == 2.5 and sd["negative_prompt"] == ["blurry"] and "true_cfg_scale" not in sd
    toml_entry = parse_prompt_file('[[prompt.subset]]\nprompt = "x"\nguidance_scale = 2.5\n', ".toml", "t")[0]
    assert toml_entry.guidance == 2.5


def _kohya_controlnet_image(line: str) -> str | None:
    """kohya's reading of ``--cn``, rewritten: sd-scripts 48d368f library/train_util.py:6254-6256 and 6302-6305
    (``line_to_prompt_dict``: the line split at " --", each part matched with ``re.match(r"cn (.+)", part,
    re.IGNORECASE)``, the last match kept as ``controlnet_image``)."""
    import re

    found = None
    for part in line.split(" --"):
        match = re.match(r"cn (.+)", part, re.IGNORECASE)
        if match:
            found = match.group(1)
    return found


@pytest.mark.parametrize(
    "line",
    [
        "a cat --cn depth.png",
        "a cat --CN edges/a b.png --w 64",  # any case; the path runs to the next " --"
        "a cat --n blurry --cn first.png --d 3 --cn second.png",  # the last one wins
        "a cat --ctr 0.5 --ci ref.png",  # kohya's --ctr (cfg_trunc_ratio) and musubi's --ci are not --cn
        "a cat --cnx.png",  # no space after cn: not the option
    ],
)
def test_cn_is_kohyas_controlnet_image(line):
    p = parse_prompt_line(line)
    assert p.control_image == _kohya_controlnet_image(line)
    assert p.prompt == "a cat" and "--cn" not in p.ignored
    assert p.control_image is None or p.control_image not in p.prompt


def test_controlnet_image_in_json_and_toml_prompt_files(tmp_path):
    """kohya's dict form: ``controlnet_image`` (the key ``line_to_prompt_dict`` writes), stripped as ``image`` is;
    a TOML ``[prompt]`` default applies to every subset; lines with different control images render apart."""
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "a cat", "controlnet_image": " pose.png ", "seed": 3}, {"prompt": "a dog"}]))
    assert [p.control_image for p in read_sample_prompts(str(j))] == ["pose.png", None]
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\ncontrolnet_image = "depth.png"\n\n[[prompt.subset]]\nprompt = "a cat"\n\n'
                 '[[prompt.subset]]\nprompt = "a dog"\ncontrolnet_image = "edges.png"\n')  # fmt: skip
    prompts = read_sample_prompts(str(t))
    assert [(p.prompt, p.control_image, p.ignored) for p in prompts] == [("a cat", "depth.png", ()),
                                                                        ("a dog", "edges.png", ())]  # fmt: skip
    same = [SamplePrompt("a", control_image="x.png"), SamplePrompt("b", control_image="x.png"),
            SamplePrompt("c", control_image="y.png")]  # fmt: skip
    assert [([p.prompt for p in group], seed) for group, seed in generation_calls(same, 10)] == [
        (["a", "b"], 10),
        (["c"], 12),
    ]
