"""HNMethod: only the hypernetwork trains, it learns, and its saved file reproduces it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sdcore.errors import ConfigError
from sdcore.train.method import SaveInfo
from sdplugin_hn import plugin
from sdplugin_hn.format import load_hypernetwork
from sdplugin_hn.method import HNMethod, HNOptions


def _fresh_bundle():
    from sdcore.models.tiny import create_tiny_bundle

    return create_tiny_bundle("sd1", seed=1)


def test_hn_learns_with_only_its_own_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bundle = _fresh_bundle()
    unet = bundle.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    method = HNMethod(HNOptions(output=str(tmp_path), name="learner", activation="relu", layer_norm=False))
    groups = method.prepare(bundle)
    params = groups[0]["params"]
    assert method.network.dims == [32, 64]
    assert not any(p.requires_grad for p in unet.parameters())
    assert not any(p.requires_grad for p in bundle.text_encoders[0].parameters())
    assert sum(p.numel() for p in params) == sum(p.numel() for p in method.network.parameters())

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([300, 700])
    context = torch.randn(2, 8, 32, generator=generator)
    noisy = bundle.noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise  # a fixed target: the network must pull the UNet's output toward it

    def loss() -> torch.Tensor:
        return F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=context).sample, target)

    optimizer = torch.optim.Adam(params, lr=1e-2)
    with torch.no_grad():
        start = loss().item()
    for _ in range(50):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        end = loss().item()
    assert end < 0.7 * start  # measured: 1.24 -> 0.62, (start, end)
    for key, value in unet.state_dict().items():
        assert torch.equal(value, before[key]), key

    # the saved result reproduces the trained network exactly (fp32 save)
    method.options.save_dtype = "fp32"
    path = method.save(bundle, SaveInfo(path=tmp_path, step=40, epoch=1, metadata={}, final=True))
    assert path == tmp_path / "learner.pt"
    intermediate = method.save(bundle, SaveInfo(path=tmp_path, step=20, epoch=1, metadata={}, final=False))
    assert intermediate == tmp_path / "learner-20.pt"
    with torch.no_grad(), method.sampling(bundle):
        trained = unet(noisy, timesteps, encoder_hidden_states=context).sample
    assert method.network.training  # sampling restores train mode
    method.remove()
    with torch.no_grad():
        base = unet(noisy, timesteps, encoder_hidden_states=context).sample
    loader = HNMethod(HNOptions())
    loader.load_result(bundle, path)
    with torch.no_grad():
        reloaded = unet(noisy, timesteps, encoder_hidden_states=context).sample
    loader.remove()
    assert torch.equal(trained, reloaded)
    assert not torch.allclose(trained, base)
    saved = load_hypernetwork(path)
    assert saved.step == 40 and saved.name == "learner" and saved.activation == "relu"

    # resumable state round-trips
    state = method.trainable_state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    other = HNMethod(HNOptions(output=str(tmp_path), name="learner", activation="relu"))
    other.prepare(_fresh_bundle())
    other.load_trainable_state_dict(state)
    for key, value in other.trainable_state_dict().items():
        assert torch.equal(value, state[key])


def test_options_validation_and_sizes() -> None:
    with pytest.raises(ConfigError, match="start and end with 1"):
        HNMethod(HNOptions(layer_structure="2,2,1")).validate()
    with pytest.raises(ConfigError, match="as many entries"):
        HNMethod(HNOptions(dropout="0,0.1,0.1,0")).validate()
    with pytest.raises(ConfigError, match="unknown hypernetwork activation"):
        HNMethod(HNOptions(activation="nope")).validate()
    method = HNMethod(
        HNOptions(sizes="32", layer_structure="1,1.5,1.5,1", activation="swish", layer_norm=True, dropout="0,0.1,0.1,0")
    )
    method.prepare(_fresh_bundle())
    assert method.network.dims == [32]
    assert method.network.use_dropout and method.network.layer_structure == [1.0, 1.5, 1.5, 1.0]
    method.remove()
    with pytest.raises(ConfigError, match="not among"):
        HNMethod(HNOptions(sizes="768")).prepare(_fresh_bundle())
    assert HNOptions().lr == 5e-6


def test_templates_fill_filewords_and_name(tmp_path: Path) -> None:
    method = HNMethod(HNOptions(name="mystyle", template="style_filewords"))
    method.validate()
    prompt = method.caption_for("a red barn", is_class=False, rng=random.Random(0))
    assert "a red barn" in prompt and "mystyle" in prompt and "[" not in prompt
    assert (
        HNMethod(HNOptions(template="hypernetwork")).caption_for("x, y", is_class=False, rng=random.Random(0)) == "x, y"
    )
    assert HNMethod(HNOptions()).caption_for("plain", is_class=False, rng=None) == "plain"
    own = tmp_path / "t.txt"
    own.write_text("[name] does [filewords]\n")
    assert (
        HNMethod(HNOptions(name="n", template=str(own))).caption_for("c", is_class=False, rng=random.Random(1))
        == "n does c"
    )
    with pytest.raises(ConfigError, match="template"):
        HNMethod(HNOptions(template=str(tmp_path / "missing.txt"))).validate()


def test_plugin_registers_method_and_prompt_network() -> None:
    methods: list = []
    networks: list = []
    plugin.sdcore_register_methods(methods.append)
    plugin.sdcore_register_prompt_networks(networks.append)
    assert methods[0].name == "hn" and "hypernetwork" in methods[0].aliases
    assert methods[0].load() is HNMethod
    spec = networks[0]
    assert (spec.name, spec.tag, spec.directory_option, spec.default_subdir) == (
        "hypernet",
        "hypernet",
        "hypernetwork_dir",
        "hypernetworks",
    )
    assert spec.load().tag == "hypernet"


def test_a1111_lr_schedule() -> None:
    from sdcore.train.lr_schedule import parse_schedule

    assert parse_schedule("5e-5:100, 5e-6:1500, 5e-7").segments == ((5e-5, 100), (5e-6, 1500), (5e-7, None))
    method = HNMethod(HNOptions(lr=1e-5, lr_schedule="5e-5:2, 1e-6"))
    method.validate()
    factor = method.lr_lambda()
    # A1111 changes the rate once step >= end_step: 5e-5 for steps 0-1, then 1e-6
    assert [round(factor(s) * 1e-5, 12) for s in (0, 1, 2, 3, 100)] == [5e-5, 5e-5, 1e-6, 1e-6, 1e-6]
    assert HNMethod(HNOptions()).lr_lambda() is None
    for bad in ("abc", "1e-5, 1e-6:10", "-1:3"):
        with pytest.raises(ConfigError, match="schedule"):
            HNMethod(HNOptions(lr_schedule=bad)).validate()


def test_save_records_the_checkpoint_hash_and_name(tmp_path: Path) -> None:
    import hashlib

    bundle = _fresh_bundle()
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not really a model")
    bundle.source = str(fake)
    method = HNMethod(HNOptions(output=str(tmp_path / "named.pt"), sizes="64"))
    method.prepare(bundle)
    path = method.save(bundle, SaveInfo(path=tmp_path / "named.pt", step=3, epoch=0, metadata={}, final=True))
    saved = load_hypernetwork(path)
    assert saved.name == "named" and saved.step == 3 and saved.dims == [64]
    assert saved.sd_checkpoint == hashlib.sha256(b"not really a model").hexdigest()[:10]
    assert saved.sd_checkpoint_name == "model"
    method.remove()


def test_name_is_a_word_not_a_path(tmp_path: Path) -> None:
    """A1111's create_hypernetwork keeps only letters, digits and '._- ' of the name (hypernetworks/ui.py);
    the name is the file stem, so '../x' used to write the result outside --output."""
    for bad in ("../escape", "sub/net", "..", "a\\b"):
        with pytest.raises(ConfigError, match="--name"):
            HNMethod(HNOptions(name=bad, output=str(tmp_path / "out"))).validate()
    HNMethod(HNOptions(name="my net-v1.2_x", output=str(tmp_path / "out"))).validate()
    HNMethod(HNOptions(output=str(tmp_path / "out"))).validate()  # no --name: the output's stem


def test_folder_output_names_result_and_state_after_the_hypernetwork(tmp_path: Path) -> None:
    """Two hypernetworks trained into one --output folder keep separate states (both were `hn-state`)."""
    from sdcore.train.checkpoints import output_paths

    out = tmp_path / "out"
    for name in ("mystyle", "other"):
        options = HNOptions(output=str(out), name=name)
        assert output_paths(HNMethod(options), options) == (out / f"{name}.pt", out / f"{name}-state")
    unnamed = HNOptions(output=str(out))
    assert output_paths(HNMethod(unnamed), unnamed) == (out / "hypernetwork.pt", out / "hypernetwork-state")
    explicit = HNOptions(output=str(out / "given.pt"), name="mystyle")
    assert output_paths(HNMethod(explicit), explicit)[0] == out / "given.pt"


def test_preflight_result_size_is_the_written_file(tmp_path: Path) -> None:
    """The pre-flight sizes the .pt with A1111's pickled structure around the tensors: within 3 % of the
    file a tiny fp16 run writes (its tensors alone at --save-dtype were 7 % under: the pickle is ~6 KiB)."""
    from sdcore.testing.contract import check_one_step, contract_options
    from sdcore.train.preflight import run_preflight

    overrides = {"save_dtype": "fp16"}
    options = contract_options(HNMethod, tmp_path / "plan", {**overrides, "max_steps": 1})
    disk = run_preflight(HNMethod(options), options).disk
    output = Path(check_one_step(HNMethod, tmp_path / "run", overrides).output)
    assert disk is not None
    assert disk.result_bytes == pytest.approx(output.stat().st_size, rel=0.03)


def _cli():
    from sdcore.cli import build_cli
    from sdcore.plugins import get_plugin_manager

    return build_cli(get_plugin_manager())


def _hn_args(tmp_path: Path, *extra: str) -> list[str]:
    from sdcore.testing.contract import make_tiny_dataset

    data = make_tiny_dataset(tmp_path / "data", n=2, size=64)
    return ["train", "hn", "--model", "tiny:sd1", "--data", str(data), "--output", str(tmp_path / "out"),
            "--name", "net", "--resolution", "64", "--min-bucket-reso", "64", "--max-bucket-reso", "128",
            "--no-progress", *extra]  # fmt: skip


#: A1111's Train tab values (hypernetworks/ui.py: "Normal", "XavierUniform", ...) and how users type them
A1111_INIT_SPELLINGS = [
    ("Normal", "normal"),
    ("XavierUniform", "xavier-uniform"),
    ("XavierNormal", "xavier-normal"),
    ("KaimingUniform", "kaiming-uniform"),
    ("KaimingNormal", "kaiming-normal"),
    ("Xavier Normal", "xavier-normal"),
    ("kaiming normal", "kaiming-normal"),
    ("xavier_uniform", "xavier-uniform"),
    ("KAIMING-UNIFORM", "kaiming-uniform"),
    ("xavier-normal", "xavier-normal"),
]


@pytest.mark.parametrize(("typed", "internal"), A1111_INIT_SPELLINGS)
def test_init_takes_a1111s_spellings_on_the_command_line_and_in_configs(
    tmp_path: Path, typed: str, internal: str
) -> None:
    import tomllib
    from click.testing import CliRunner
    from sdcore.train.config import load_options

    saved = tmp_path / "effective.toml"
    result = CliRunner().invoke(_cli(), _hn_args(tmp_path, "--init", typed, "--save-config", str(saved), "--dry-run"))
    assert result.exit_code == 0, result.output
    assert tomllib.loads(saved.read_text(encoding="utf-8"))["init"] == internal
    config = tmp_path / "hn.toml"
    config.write_text(f'init = "{typed}"\n', encoding="utf-8")
    assert load_options(HNOptions, str(config), notes=[]).init == internal
    HNMethod(HNOptions(init=typed)).validate()  # the Python API takes them as well


def test_an_a1111_spelled_init_trains_and_is_stored_as_a1111_names_it(tmp_path: Path) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(_cli(), _hn_args(tmp_path, "--init", "Xavier Normal", "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    assert load_hypernetwork(tmp_path / "out" / "net.pt").weight_init == "XavierNormal"


def test_an_unknown_init_lists_the_accepted_values(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from sdcore.train.config import load_options

    result = CliRunner().invoke(_cli(), _hn_args(tmp_path, "--init", "Xavier Gaussian", "--dry-run"))
    assert result.exit_code == 2
    assert "Xavier Gaussian" in result.output
    for name in ("normal", "xavier-uniform", "xavier-normal", "kaiming-uniform", "kaiming-normal"):
        assert name in result.output
    config = tmp_path / "hn.toml"
    config.write_text('init = "orthogonal"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"orthogonal.*choose one of normal, xavier-uniform, xavier-normal"):
        load_options(HNOptions, str(config), notes=[])
    with pytest.raises(ConfigError, match=r"orthogonal.*normal, xavier-uniform, xavier-normal, kaiming-uniform"):
        HNMethod(HNOptions(init="orthogonal")).validate()
