"""The toy world's CLIP model: deterministic, its text tower the base encoder, cached once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDCORE_CACHE_DIR", str(tmp_path / "cache"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(folder).state_dict()


def test_build_is_deterministic_and_keeps_the_base_encoder(tmp_path: Path) -> None:
    from sdcore.testing.contract import toyworld_bundle
    from sdcore.testing.toyworld.clip import build_toy_clip

    first = _weights(build_toy_clip(tmp_path / "a", steps=3))
    second = _weights(build_toy_clip(tmp_path / "b", steps=3))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    encoder = toyworld_bundle().text_encoders[0].state_dict()
    for key, value in encoder.items():  # the text tower is the model's encoder, untouched by training
        assert torch.equal(first[f"text_model.{key}"], value.float()), key
    untrained = build_toy_clip(tmp_path / "c", steps=0)
    assert not torch.equal(_weights(untrained)["visual_projection.weight"], first["visual_projection.weight"])


def test_toy_clip_dir_builds_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdcore.testing.toyworld import clip

    calls: list[Path] = []
    real = clip.build_toy_clip

    def counting(folder: Path, **kwargs: int) -> Path:
        calls.append(Path(folder))
        return real(folder, steps=2)

    monkeypatch.setattr(clip, "build_toy_clip", counting)
    folder = clip.toy_clip_dir()
    assert (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file()
    assert clip.toy_clip_dir() == folder
    assert len(calls) == 1
    assert not list(folder.parent.glob("*.tmp*"))  # built beside it and renamed into place
    monkeypatch.setattr(clip, "RECIPE", clip.RECIPE + 1)  # a new recipe is a new cache entry
    assert clip.toy_clip_dir() != folder
    assert len(calls) == 2


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$SDCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdcore``, else ``~/.cache/sdcore`` (tokenizers and the toy CLIP)."""
    from sdcore.io import cache_dir
    from sdcore.models.tokenizer import _cache_dir
    from sdcore.testing.toyworld.clip import _cache_root

    assert cache_dir() == tmp_path / "cache"
    assert _cache_dir() == tmp_path / "cache" / "tokenizers" and _cache_root() == tmp_path / "cache" / "toyworld-clip"
    monkeypatch.delenv("SDCORE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sdcore"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "sdcore"
