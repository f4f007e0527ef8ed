"""The CLIP BPE tokenizer, shipped with sdcore so a lone checkpoint tokenizes with no network.

The merges come from OpenAI's CLIP release (MIT licence; the copy is the one the
``open_clip_torch`` wheel carries, see ``tokenizer_data/LICENSE-open_clip.txt``). The vocabulary is
rebuilt from the merges the same way CLIP does it: 256 byte symbols, the same with ``</w>``, one
entry per merge, then the two special tokens, 49408 ids in all. SD1 and SDXL's first encoder pad
with ``<|endoftext|>``; OpenCLIP encoders (SD2, SDXL's second) pad with ``!`` (id 0).
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
OPENCLIP_PAD_TOKEN = "!"


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Return CLIP's ``vocab`` (token -> id) and the ordered merge list."""
    data = resources.files("sdcore.models").joinpath("tokenizer_data/bpe_simple_vocab_16e6.txt.gz")
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
        lines = text.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(directory: str | os.PathLike[str], *, pad_token: str = EOS_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs a CLIPTokenizer folder has."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return out


def _cache_dir() -> Path:
    from ..io import cache_dir

    return cache_dir() / "tokenizers"


@lru_cache(maxsize=4)
def _bundled_folder(pad_token: str) -> Path:
    name = "clip-openclip-pad" if pad_token == OPENCLIP_PAD_TOKEN else "clip"
    folder = _cache_dir() / name
    if not (folder / "tokenizer_config.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        write_tokenizer_files(tmp, pad_token=pad_token)
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def bundled_clip_tokenizer(*, pad_token: str = EOS_TOKEN) -> Any:
    """A ``transformers.CLIPTokenizer`` built from the bundled merges (no network)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(_bundled_folder(pad_token)))


def load_clip_tokenizer(path: str | os.PathLike[str] | None = None, *, pad_token: str = EOS_TOKEN) -> Any:
    """Load a tokenizer from ``path`` when given (a folder with tokenizer files), else the bundled one."""
    if path is not None:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(path))
    return bundled_clip_tokenizer(pad_token=pad_token)
