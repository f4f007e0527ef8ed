"""A1111 infotext: layout, round trip, PNG chunk readable by PIL, atomic save."""

from __future__ import annotations

import logging

import pytest
from exif_bytes import a1111_exif
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sdcore.errors import ConfigError
from sdcore.generate.pnginfo import (
    GenerationParameters,
    format_parameters,
    model_short_hash,
    parse_parameters,
    read_png_parameters,
    save_png,
)


def test_a1111_layout():
    text = format_parameters(
        "a cat, (masterpiece:1.2)",
        "blurry",
        20,
        "euler_a",
        7.0,
        1,
        (512, 512),
        "abcdef1234",
        "name",
        {"Lora hashes": "x: 0123456789ab, y: ba9876543210"},
    )
    assert text == (
        "a cat, (masterpiece:1.2)\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abcdef1234, Model: name, "
        'Lora hashes: "x: 0123456789ab, y: ba9876543210"'
    )
    assert "Negative prompt" not in format_parameters("p", "", 20, "ddim", 7.5, 2, (64, 64), None, None, {})
    assert format_parameters("p", "", 20, "ddim", 7.5, 2, (64, 64), None, None, {}).endswith(
        "Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 2, Size: 64x64"
    )


def test_parse_a1111_text():
    text = (
        "masterpiece, 1girl\nsecond line\nNegative prompt: lowres,\nbad hands\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, "
        'Model: anything-v3, Clip skip: 2, Lora hashes: "a: 1, b: 2", Version: v1.9.4'
    )
    params = parse_parameters(text)
    assert params.prompt == "masterpiece, 1girl\nsecond line"
    assert params.negative_prompt == "lowres,\nbad hands"
    assert (params.steps, params.sampler, params.cfg, params.seed) == (28, "dpm++2m_karras", 7.5, 1234)
    assert params.size == (512, 768) and params.model_hash == "6ce0161689" and params.model_name == "anything-v3"
    assert params.extra == {"Clip skip": "2", "Lora hashes": "a: 1, b: 2", "Version": "v1.9.4"}
    assert parse_parameters("just a prompt") == GenerationParameters(prompt="just a prompt")
    with pytest.raises(ConfigError):
        parse_parameters("p\nSteps: many, Sampler: x, Seed: 1")


def test_a_field_line_with_unparsable_stretches_is_read_around_them():
    # A1111 reads the last line with re_param.findall (modules/infotext_utils.py parse_generation_parameters):
    # a stretch no field pattern matches is skipped, the fields around it still count. Civitai's generator
    # writes such a line (its unquoted "Civitai resources" JSON list); the settings must not become the
    # negative prompt.
    text = (
        "a cat\nNegative prompt: dog\n"
        "Steps: 22, Sampler: DPM++ 2M Karras, CFG scale: 3.8, Seed: 894409639, Size: 832x1216, Clip skip: 2, "
        "Created Date: 2024-09-23T06:17:42.9952795Z, Civitai resources: "
        '[{"type":"checkpoint","modelVersionId":128078,"modelName":"SD XL","modelVersionName":"v1.0 VAE fix"}], '
        "Civitai metadata: {}"
    )
    params = parse_parameters(text)
    assert (params.prompt, params.negative_prompt) == ("a cat", "dog")
    assert (params.steps, params.sampler, params.cfg, params.seed, params.size) == (
        22,
        "dpm++2m_karras",
        3.8,
        894409639,
        (832, 1216),
    )
    assert params.extra["Clip skip"] == "2" and params.extra["Created Date"] == "2024-09-23T06:17:42.9952795Z"
    assert params.extra["Civitai metadata"] == "{}"
    # fewer than three fields is still a prompt line, as in A1111
    assert parse_parameters("a: b, {c}").prompt == "a: b, {c}"


#: the field pattern in its plain form (A1111's re_param shape, sdcore's one-character keys), which rescans a
#: stretch of key characters from each of its characters: the reference sdcore's linear one must agree with
_PLAIN_FIELD = r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)'


@settings(max_examples=3000, deadline=None)
@given(
    st.lists(
        st.sampled_from(["a", "Zé", "7", "_", " ", "-", "/", ":", ",", '"', "\\", "\t", ".", "\xa0", "{", "Steps: 2"]),
        max_size=30,
    ).map("".join)
)
def test_the_field_pattern_finds_what_the_plain_one_finds(line):
    import re

    from sdcore.generate.pnginfo import _FIELD_RE

    def fields(pattern):
        return [(m.start(1), m.group(1), m.group(2), m.end()) for m in pattern.finditer(line)]

    assert fields(_FIELD_RE) == fields(re.compile(_PLAIN_FIELD))


@pytest.mark.parametrize(
    "filler",
    ["word " * 10_000, "x" * 50_000, "a-b/c " * 8_400],
    ids=["words", "one-word", "dashes"],
)
def test_a_50k_character_field_line_parses_at_once(filler):
    # the plain pattern takes tens of seconds on these (each a stretch of key characters with no colon after it)
    import time

    line = f"Steps: 20, Sampler: Euler a, Seed: 5, {filler.strip()}, CFG scale: 7, Notes: {filler.strip()}"
    assert len(line) > 50_000
    start = time.perf_counter()
    params = parse_parameters(f"a cat\n{line}")
    took = time.perf_counter() - start
    assert (params.prompt, params.steps, params.sampler, params.seed, params.cfg) == ("a cat", 20, "euler_a", 5, 7.0)
    assert params.extra["Notes"] == filler.strip()
    assert took < 0.5, f"{took:.2f} s"
    # a long prompt line and no field line at all: the same pattern reads the prompt's line first
    start = time.perf_counter()
    assert parse_parameters(filler).prompt == filler
    assert time.perf_counter() - start < 0.5


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(
    prompt=_TEXT.filter(lambda t: not t.startswith("Negative prompt:") and "\nNegative prompt:" not in t),
    negative=_TEXT,
    steps=st.integers(1, 150),
    sampler=st.sampled_from(["euler_a", "dpm++2m_karras", "ddim", "heun"]),
    cfg=st.floats(0, 30, allow_nan=False),
    seed=st.integers(0, 2**32),
    size=st.tuples(st.integers(8, 4096), st.integers(8, 4096)),
    model_hash=st.none() | st.text(alphabet="0123456789abcdef", min_size=10, max_size=10),
    model_name=st.none() | st.text(alphabet='abc-_. :,"', min_size=1, max_size=10).filter(lambda t: t.strip() == t),
    extra=st.dictionaries(
        st.sampled_from(["Lora hashes", "Clip skip", "TI hashes", "Denoising strength"]), _TEXT, max_size=3
    ),
)
def test_round_trip(prompt, negative, steps, sampler, cfg, seed, size, model_hash, model_name, extra):
    original = GenerationParameters(prompt, negative, steps, sampler, cfg, seed, size, model_hash, model_name, extra)
    parsed = parse_parameters(original.format())
    assert parsed == original


def test_png_chunk_is_readable_by_pil(tmp_path):
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    text = format_parameters("a ünïcode cat", "bad", 2, "euler", 7, 3, image.size, None, "tiny", {"Clip skip": 2})
    path = save_png(image, tmp_path / "out" / "a.png", text)
    with Image.open(path) as reopened:
        assert reopened.info["parameters"] == text
        assert reopened.size == (16, 16)
    assert read_png_parameters(path).prompt == "a ünïcode cat"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # no temp files left
    save_png(image, tmp_path / "plain.png", GenerationParameters("x", steps=1, sampler="ddim", seed=0))
    assert read_png_parameters(tmp_path / "plain.png").sampler == "ddim"
    save_png(image, tmp_path / "none.png", None)
    assert read_png_parameters(tmp_path / "none.png") is None


def test_model_short_hash(tmp_path):
    import hashlib

    path = tmp_path / "m.safetensors"
    path.write_bytes(b"weights" * 1000)
    assert model_short_hash(path) == hashlib.sha256(b"weights" * 1000).hexdigest()[:10]
    assert (
        model_short_hash(tmp_path) is None and model_short_hash("tiny:sd1") is None and model_short_hash(None) is None
    )


def test_bad_extra_key():
    with pytest.raises(ConfigError):
        format_parameters("p", extra={"bad:key": "1"})


def _a1111_parse(text: str) -> dict[str, str]:
    """A1111's PNG Info reader rewritten from its documented behaviour (modules/infotext_utils.py
    parse_generation_parameters): the last line holds the fields when its field regex finds 3 or
    more; a field is ``\\w[\\w \\-/]+`` (two or more characters), ':' and a JSON string or text up to
    the next ','; quoted values are json-decoded; ``WxH`` values become ``Key-1`` and ``Key-2``;
    lines are stripped; "Negative prompt:" starts the negative prompt."""
    import json
    import re

    field = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    lines = text.strip().split("\n")
    last = lines[-1]
    if len(field.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines[:-1] if last else lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[16:].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in field.findall(last):
        value = value.strip()
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = re.match(r"^(\d+)x(\d+)$", value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


def test_what_we_write_parses_back_in_a1111():
    extra = {
        "Clip skip": 2,
        "RNG": "CPU",
        "Lora hashes": "style: 0123456789ab, b: ba9876543210",
        "TI hashes": "bad-hands: 00112233aabb",
        "Note": 'say "hi"',
        "Version": "sdcore 1.0",
    }
    text = format_parameters(
        "a castle, (detailed:1.2)\nsecond: line", "lowres, bad hands", 25, "dpm++2m_karras", 6.5, 42,
        (768, 512), "abcdef1234", "my model", extra,
    )  # fmt: skip
    parsed = _a1111_parse(text)
    assert parsed == {
        "Prompt": "a castle, (detailed:1.2)\nsecond: line",
        "Negative prompt": "lowres, bad hands",
        "Steps": "25",
        "Sampler": "DPM++ 2M Karras",
        "CFG scale": "6.5",
        "Seed": "42",
        "Size-1": "768",
        "Size-2": "512",
        "Model hash": "abcdef1234",
        "Model": "my model",
        "Clip skip": "2",
        "RNG": "CPU",
        "Lora hashes": "style: 0123456789ab, b: ba9876543210",
        "TI hashes": "bad-hands: 00112233aabb",
        "Note": 'say "hi"',
        "Version": "sdcore 1.0",
    }


def test_one_letter_field_names_are_refused():
    """A1111's field regex needs two or more characters in a name: a one-letter field would be
    read as part of the previous value, so it is refused when writing."""
    with pytest.raises(ConfigError):
        format_parameters("p", extra={"X": "1"})


# --- "Schedule type" (A1111 1.9+) -------------------------------------------------------------------
# Rewritten from A1111 (facts only): modules/sd_schedulers.py (uniform, sgm_uniform, ddim, karras),
# modules/sd_samplers_kdiffusion.py (DPM++ 2M's default scheduler is karras, Euler/Euler a/Heun/LMS have
# none: "Automatic" is then the model's uniform sigmas), modules/sd_samplers.py get_sampler_and_scheduler
# (a schedule label at the end of the sampler name wins; the sampler's own default reads as Automatic)
# and modules/infotext_utils.py (a missing "Schedule type" is "Automatic").
_A1111_SCHEDULES = ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform", "DDIM"]
_A1111_DEFAULT = {"DPM++ 2M": "Karras"}


def _a1111_19_schedule(fields: dict[str, str]) -> tuple[str, str]:
    """(sampler, schedule actually used) that A1111 1.9+ restores from infotext ``fields``."""
    name, schedule = fields["Sampler"], fields.get("Schedule type", "Automatic")
    for label in _A1111_SCHEDULES:
        if name.endswith(" " + label):
            name, schedule = name[: -len(label) - 1], label
            break
    if schedule == "Automatic":
        schedule = _A1111_DEFAULT.get(name, "Uniform")
    return name, schedule


def _a1111_18_schedule(fields: dict[str, str]) -> tuple[str, str]:
    """Before 1.9 the sampler name alone decides: "X Karras" is Karras, every other one uniform."""
    name = fields["Sampler"]
    return (name[:-7], "Karras") if name.endswith(" Karras") else (name, "Uniform")


def _a1111_sigmas(bundle, schedule: str, n: int):
    """A1111's sigmas of ``schedule`` for ``n`` steps over the model's trained sigmas (k-diffusion's
    discrete schedule: log sigma interpolated between integer timesteps)."""
    import numpy as np

    acp = bundle.noise_scheduler.alphas_cumprod.double().numpy()
    trained = np.sqrt((1 - acp) / acp)

    def at(t):
        return np.exp(np.interp(t, np.arange(len(trained)), np.log(trained)))

    if schedule == "Uniform":
        sig = at(np.linspace(999, 0, n))
    elif schedule == "SGM Uniform":
        sig = at(np.linspace(999, 0, n + 1)[:-1])
    elif schedule == "Karras":
        ramp = np.linspace(0, 1, n)
        lo, hi = trained[0] ** (1 / 7), trained[-1] ** (1 / 7)
        sig = (hi + ramp * (lo - hi)) ** 7
    elif schedule == "DDIM":
        sig = trained[list(range(1, 1000, max(1000 // n, 1)))][::-1]
    else:
        raise AssertionError(schedule)
    return np.append(sig, 0.0)


def _field(sd1, sampler):
    from sdcore.generate.pipeline import schedule_type_field

    return schedule_type_field(sd1, sampler)


def test_schedule_type_is_written_where_a1111_19_needs_it(sd1):
    from sdcore.generate.pipeline import SAMPLERS

    expected = {"euler_a": None, "euler": None, "dpm++2m": "SGM Uniform", "dpm++2m_karras": None, "ddim": None,
                "heun": None, "pndm": None, "unipc": None}  # fmt: skip
    assert {s: _field(sd1, s) for s in SAMPLERS if s != "lms"} == expected
    assert _field(sd1, "DPM++ 2M") == "SGM Uniform"  # labels work as ids


@pytest.mark.parametrize("sampler", ["euler_a", "euler", "dpm++2m", "dpm++2m_karras"])
def test_a1111_19_restores_the_sigmas_sdcore_used(sd1, sampler):
    """What A1111 1.9+ reads from the infotext is the schedule sdcore sampled with: the sigmas agree
    (to diffusers' linear-vs-log interpolation and whole-number timesteps)."""
    import numpy as np
    from sdcore.generate.pipeline import make_scheduler

    text = format_parameters("p", "", 20, sampler, 7, 1, (64, 64), extra={"Schedule type": _field(sd1, sampler)})
    fields = _a1111_parse(text)
    name, schedule = _a1111_19_schedule(fields)
    scheduler = make_scheduler(sd1, sampler)
    scheduler.set_timesteps(20)
    ours = scheduler.sigmas.double().numpy()
    np.testing.assert_allclose(ours, _a1111_sigmas(sd1, schedule, 20), rtol=0.03, atol=1e-3)
    # the old reader gets the same sampler; the same schedule where it has one (not SGM Uniform)
    old_name, old_schedule = _a1111_18_schedule(fields)
    assert old_name == name and (old_schedule == schedule or schedule == "SGM Uniform")
    if sampler == "dpm++2m":  # without the field A1111 1.9+ would sample it with Karras sigmas
        assert _a1111_19_schedule({"Sampler": "DPM++ 2M"})[1] == "Karras"
        assert not np.allclose(ours, _a1111_sigmas(sd1, "Karras", 20), rtol=0.03, atol=1e-3)


def test_leading_spacing_is_the_ddim_schedule(sd1):
    """A model whose scheduler config asks for ``leading`` timesteps (SDXL's diffusers folder) samples
    Euler on A1111's "DDIM" schedule, and says so."""
    import copy

    import numpy as np
    from sdcore.generate.pipeline import make_scheduler
    from sdcore.models.load import _noise_scheduler

    bundle = copy.copy(sd1)
    bundle.noise_scheduler = _noise_scheduler({"steps_offset": 1, "timestep_spacing": "leading"}, "epsilon")
    assert _field(bundle, "euler") == "DDIM" and _field(bundle, "dpm++2m_karras") is None
    scheduler = make_scheduler(bundle, "euler")
    scheduler.set_timesteps(20)
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), _a1111_sigmas(bundle, "DDIM", 20), rtol=1e-5)


@pytest.mark.parametrize("fmt", ["single-file", "diffusers"])
def test_a_saved_sd1_keeps_euler_as_uniform_and_a_leading_config_stays_ddim(sd1, tmp_path, fmt):
    """SD1.5's scheduler config names no timestep spacing, so Euler a runs diffusers' ``linspace``, A1111's
    "Uniform" (its Automatic for Euler a: no field). A model sdcore saved and loads again keeps that: it once
    wrote DDPM's default ``leading`` out, and Euler a on the reloaded file then ran (and said) "DDIM". A config
    that asks for ``leading`` (SDXL's folder) keeps it through a save, and Euler a says "DDIM" there, rightly:
    its sigmas are A1111's DDIM schedule, as Euler's."""
    import copy

    import numpy as np
    from sdcore.generate.pipeline import make_scheduler
    from sdcore.models.load import _noise_scheduler, load_model
    from sdcore.models.save import save_bundle

    for spacing, schedule in ((None, "Uniform"), ("leading", "DDIM")):
        bundle = copy.copy(sd1)
        if spacing:
            bundle.noise_scheduler = _noise_scheduler({"steps_offset": 1, "timestep_spacing": spacing}, "epsilon")
        path = tmp_path / f"{spacing}{'.safetensors' if fmt == 'single-file' else ''}"
        again = load_model(str(save_bundle(bundle, path, format=fmt)))
        assert _field(again, "euler_a") == (None if schedule == "Uniform" else schedule)
        for sampler in ("euler_a", "euler"):
            scheduler = make_scheduler(again, sampler)
            scheduler.set_timesteps(20)
            want = _a1111_sigmas(again, schedule, 20)
            np.testing.assert_allclose(scheduler.sigmas.double().numpy(), want, rtol=1e-2, atol=1e-3)


def test_schedule_type_sits_after_the_sampler_and_parses_back():
    text = format_parameters(
        "p", "", 20, "dpm++2m", 7, 1, (64, 64), extra={"RNG": "CPU", "Schedule type": "SGM Uniform"}
    )
    assert "Steps: 20, Sampler: DPM++ 2M, Schedule type: SGM Uniform, CFG scale: 7" in text
    assert _a1111_parse(text)["Schedule type"] == "SGM Uniform"
    back = parse_parameters(text)
    assert back.sampler == "dpm++2m" and back.extra["Schedule type"] == "SGM Uniform"
    assert format_parameters("p", "", 20, "euler_a", extra={"Schedule type": None}).endswith("Sampler: Euler a")
    # A1111 1.9+ images: DPM++ 2M with Karras, or with Automatic (Karras for it), is dpm++2m_karras
    for schedule in ("Karras", "Automatic"):
        parsed = parse_parameters(f"p\nSteps: 20, Sampler: DPM++ 2M, Schedule type: {schedule}, Seed: 1")
        assert parsed.sampler == "dpm++2m_karras" and "Schedule type" not in parsed.extra
    assert parse_parameters("p\nSteps: 20, Sampler: DPM++ 2M, Seed: 1").sampler == "dpm++2m"  # before 1.9


_EXIF_INFOTEXT = (
    "a castle on a hill, 城, (masterpiece:1.2)\nNegative prompt: blurry\n"
    "Steps: 24, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 1234, Size: 64x48, Model hash: 0123456789"
)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_infotext_is_read_from_the_exif_user_comment(tmp_path, fmt):
    # A1111: piexif.helper.UserComment.dump(geninfo, encoding="unicode"): the EXIF character code "UNICODE\0"
    # (8 bytes) and the text in UTF-16 big-endian (piexif's "unicode")
    path = tmp_path / f"a1111.{fmt.lower()}"
    exif = a1111_exif(b"UNICODE\0" + _EXIF_INFOTEXT.encode("utf-16-be"))
    Image.new("RGB", (64, 48), "gray").save(path, format=fmt, quality=90, exif=exif)
    read = read_png_parameters(path)
    assert read is not None
    assert read.prompt == "a castle on a hill, 城, (masterpiece:1.2)" and read.negative_prompt == "blurry"
    assert (read.steps, read.sampler, read.cfg, read.seed) == (24, "dpm++2m_karras", 6.5, 1234)
    assert read.size == (64, 48) and read.model_hash == "0123456789"


def test_exif_user_comment_prefixes_as_a1111_reads_them(tmp_path):
    # piexif's UserComment.load: "ASCII\0\0\0" -> ASCII; "UNDEFINED" (8 NULs), too short or unknown prefixes raise,
    # and A1111's read_info_from_image then decodes the whole value as UTF-8, ignoring what does not decode
    path = tmp_path / "x.jpg"
    text = "a dog\nSteps: 7, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 8x8"
    for comment in (b"ASCII\0\0\0" + text.encode(), text.encode(), bytes(8) + text.encode() + b"\xff"):
        Image.new("RGB", (8, 8)).save(path, format="JPEG", exif=a1111_exif(comment))
        read = read_png_parameters(path)
        assert read is not None and (read.prompt, read.steps, read.seed) == ("a dog", 7, 3), comment
    Image.new("RGB", (8, 8)).save(path, format="JPEG")  # no EXIF at all
    assert read_png_parameters(path) is None


# --- JPEG / WebP / AVIF output (A1111's "File format for images") ---------------------------------------------------

_MAGIC = {"JPEG": lambda b: b[:3] == b"\xff\xd8\xff", "WEBP": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP",
          "AVIF": lambda b: b[4:12] in (b"ftypavif", b"ftypavis")}  # fmt: skip


def _raw_exif(data: bytes, fmt: str) -> bytes:
    """The EXIF a file holds, found by walking its container, not by PIL: a JPEG's APP1 ``Exif\\0\\0`` segment,
    a WebP's ``EXIF`` RIFF chunk (the TIFF bytes alone, as PIL writes it; given the header back here)."""
    if fmt == "JPEG":
        at = 2
        while data[at] == 0xFF and data[at + 1] != 0xDA:  # segments up to the scan
            length = int.from_bytes(data[at + 2 : at + 4], "big")
            body = data[at + 4 : at + 2 + length]
            if data[at + 1] == 0xE1 and body.startswith(b"Exif\0\0"):
                return body
            at += 2 + length
        raise AssertionError("no APP1 Exif segment")
    at = 12
    while at < len(data):
        kind, size = data[at : at + 4], int.from_bytes(data[at + 4 : at + 8], "little")
        if kind == b"EXIF":
            body = data[at + 8 : at + 8 + size]
            return body if body.startswith(b"Exif\0\0") else b"Exif\0\0" + body
        at += 8 + size + (size & 1)
    raise AssertionError("no EXIF chunk")


def _user_comment(exif: bytes) -> tuple[int, bytes]:
    """(type, bytes) of the Exif IFD's UserComment, decoded from the TIFF structure by hand (either byte order)."""
    tiff = exif[6:]
    order = {b"MM": "big", b"II": "little"}[tiff[:2]]

    def num(at: int, size: int) -> int:
        return int.from_bytes(tiff[at : at + size], order)  # type: ignore[arg-type]

    def entries(ifd: int):
        for index in range(num(ifd, 2)):
            at = ifd + 2 + 12 * index
            yield num(at, 2), num(at + 2, 2), num(at + 4, 4), at + 8

    pointer = next(num(value_at, 4) for tag, _, _, value_at in entries(num(4, 4)) if tag == 0x8769)
    kind, count, value_at = next((k, c, v) for tag, k, c, v in entries(pointer) if tag == 0x9286)
    return kind, tiff[num(value_at, 4) : num(value_at, 4) + count]


_WRITTEN = (
    "a castle on a hill, 城, ünïcödé (masterpiece:1.2)\nNegative prompt: blurry, 低品質\n"
    "Steps: 24, Sampler: Euler a, CFG scale: 6.5, Seed: 1234, Size: 64x48, Model hash: 0123456789"
)


@pytest.mark.parametrize(("suffix", "fmt"), [(".jpg", "JPEG"), (".JPEG", "JPEG"), (".webp", "WEBP"), (".avif", "AVIF")])
def test_save_image_writes_the_suffixs_format_with_the_exif_user_comment(tmp_path, suffix, fmt):
    from sdcore.generate.pnginfo import save_image

    if fmt == "AVIF" and not __import__("PIL.features").features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec (sdcore refuses .avif there: see the test below)")
    image = Image.new("RGBA", (64, 48), (200, 30, 90, 128))  # JPEG/WebP have no alpha in A1111's saves
    path = save_image(image, tmp_path / "out" / f"a{suffix}", GenerationParameters.format(parse_parameters(_WRITTEN)))
    assert path == tmp_path / "out" / f"a{suffix}" and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    data = path.read_bytes()
    assert _MAGIC[fmt](data), data[:16]
    with Image.open(path) as reopened:
        # A1111 drops the alpha for JPEG and WebP only; an AVIF keeps it
        assert (
            reopened.format == fmt
            and reopened.size == (64, 48)
            and reopened.mode == ("RGBA" if fmt == "AVIF" else "RGB")
        )
    read = read_png_parameters(path)
    assert read == parse_parameters(_WRITTEN) and read.negative_prompt == "blurry, 低品質"
    if fmt == "AVIF":  # an ISO-BMFF box tree: PIL's reading above is the check
        return
    exif = _raw_exif(data, fmt)
    # piexif's layout (what A1111 writes), built in exif_bytes from the format's documentation
    assert exif == a1111_exif(b"UNICODE\0" + _WRITTEN.encode("utf-16-be"))
    kind, comment = _user_comment(exif)
    assert kind == 7 and comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == _WRITTEN


def test_user_comment_exif_is_piexifs_dump_byte_for_byte():
    # piexif 1.1.3 (not installed here; run once by a reviewer): piexif.dump({"Exif": {piexif.ExifIFD.UserComment:
    # piexif.helper.UserComment.dump("猫, Steps: 2", encoding="unicode")}}).hex(), what A1111 inserts in a JPEG/WebP
    from sdcore.generate.pnginfo import user_comment_exif

    piexif_dump = bytes.fromhex(
        "4578696600004d4d002a00000008000187690004000000010000001a000000000001928600070000001e00000028554e49434f4445"
        "00732b002c002000530074006500700073003a00200032"
    )
    assert user_comment_exif("猫, Steps: 2") == piexif_dump


def test_save_image_quality_and_lossless_take_effect(tmp_path):
    import numpy as np
    from sdcore.generate.pnginfo import save_image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pixels = np.asarray(image).astype(int)

    def error(path):
        with Image.open(path) as reopened:
            return np.abs(np.asarray(reopened.convert("RGB")).astype(int) - pixels).mean()

    low = save_image(image, tmp_path / "low.jpg", "x", jpeg_quality=10)
    high = save_image(image, tmp_path / "high.jpg", "x", jpeg_quality=95)
    default = save_image(image, tmp_path / "default.jpg", "x")  # A1111's jpeg_quality default, 80
    assert low.stat().st_size < default.stat().st_size < high.stat().st_size
    assert error(high) < error(default) < error(low)
    lossless = save_image(image, tmp_path / "lossless.webp", "x", webp_lossless=True)
    lossy = save_image(image, tmp_path / "lossy.webp", "x")
    assert error(lossless) == 0 and error(lossy) > 1
    assert read_png_parameters(lossless).prompt == "x" and read_png_parameters(lossy).prompt == "x"


def test_unknown_suffix_and_what_a_format_cannot_hold(tmp_path, monkeypatch, caplog):
    from sdcore.generate.pnginfo import image_format, save_image

    with pytest.raises(ConfigError, match=r"^a\.gif: unknown image type '\.gif'; use \.png, \.jpg/\.jpeg, \.webp or "):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "a.gif", "x")
    assert not list(tmp_path.iterdir())
    assert image_format(tmp_path / "no-suffix") == "PNG"  # as before: a name without a suffix is a PNG
    from PIL import features

    monkeypatch.setattr(features, "check", lambda name: name != "avif")  # a Pillow built without libavif
    with pytest.raises(ConfigError, match=r"^a\.avif: this Pillow has no AVIF codec; use \.png, \.jpg, or \.webp$"):
        image_format(tmp_path / "a.avif")
    monkeypatch.undo()
    # a WebP side is at most 16383 pixels: saved as PNG next to it, as A1111 does, never over an existing file
    (tmp_path / "wide.png").write_bytes(b"earlier")
    said: list[str] = []
    path = save_image(Image.new("RGB", (16384, 2)), tmp_path / "wide.webp", "a cat", warn=said.append)
    assert path == tmp_path / "wide-2.png" and (tmp_path / "wide.png").read_bytes() == b"earlier"
    assert not (tmp_path / "wide.webp").exists() and read_png_parameters(path).prompt == "a cat"
    assert said == [f"{tmp_path / 'wide.webp'}: a WEBP holds at most 16383 pixels a side and the image is 16384x2; "
                    f"saved as PNG: {path}"]  # fmt: skip
    # with overwrite (generate's --overwrite) the PNG beside it is replaced, as the asked-for file would have been
    path = save_image(Image.new("RGB", (16384, 2)), tmp_path / "wide.webp", "a dog", overwrite=True, warn=said.append)
    assert path == tmp_path / "wide.png" and read_png_parameters(path).prompt == "a dog"
    # a JPEG's EXIF is one 64 KB segment: a longer infotext goes to a PNG too (A1111's piexif would fail)
    # 54 bytes of header, IFDs and "UNICODE\0", then 2 bytes a character: 32739 characters fit, 32740 do not
    fits = ("a castle on a hill " * 1724)[:32739]  # one long line, as a pasted prompt (parsed in linear time)
    assert len(fits) == 32739
    assert save_image(Image.new("RGB", (8, 8)), tmp_path / "fits.jpg", fits) == tmp_path / "fits.jpg"
    assert read_png_parameters(tmp_path / "fits.jpg").prompt == fits
    with caplog.at_level(logging.WARNING, logger="sdcore.generate.pnginfo"):  # no ``warn``: logged, as sdcore warns
        path = save_image(Image.new("RGB", (8, 8)), tmp_path / "long.jpg", fits + "x")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'long.jpg'}: a JPEG's EXIF holds at most 65533 bytes and the infotext's takes 65534; "
        f"saved as PNG: {path}"
    ]
    assert path == tmp_path / "long.png" and read_png_parameters(path).prompt == fits + "x"
    assert not (tmp_path / "long.jpg").exists()


def test_png_fallback_takes_free_path_from_io_not_from_training(tmp_path):
    """``save_image``'s PNG fallback names its file with :func:`sdcore.io.free_path` (``-2``, ``-3`` ... past taken
    names), the one rule training samples follow too; writing it imports nothing of ``sdcore.train``."""
    import subprocess
    import sys

    from sdcore.io import free_path

    assert free_path(tmp_path / "a.png") == tmp_path / "a.png"
    (tmp_path / "a.png").write_bytes(b"1")
    (tmp_path / "a-2.png").write_bytes(b"2")
    assert free_path(tmp_path / "a.png") == tmp_path / "a-3.png"
    code = (
        "import sys; from PIL import Image; from sdcore.generate.pnginfo import save_image; "
        f"p = save_image(Image.new('RGB', (16384, 2)), {str(tmp_path / 'a.webp')!r}, 'x', warn=lambda m: None); "
        "print(p.name, sorted(m for m in sys.modules if m.startswith('sdcore.train')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["a-3.png", "[]"]
