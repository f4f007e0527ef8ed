"""Adding and removing an embedding's tokens: sdcore's ``add_tokens``/``remove_tokens`` against the way they
worked before (kept here only as the reference: a ``get_vocab()`` per new token to check it is free, and a
removal that rebuilt the whole tokenizer through its JSON serialization).

Per tokenizer (CLIP as SD1/SDXL's first, OpenCLIP-padded as SDXL's second, the tiny T5) one add + remove cycle
of two tokens, and the whole cycle on a tiny SDXL bundle (``add_token_rows`` + ``TokenRows.remove``: both
tokenizers and text encoders, what one embedding costs per prompt in generation). Both routes must leave the
tokenizer byte-identical to the one before (checked every run). Goal: removal under 5 ms per tokenizer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any

from .common import print_table, time_call, write_json

TOKENS = ["<bench-emb>", "<bench-emb>b"]


def old_add_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """sdcore's add_tokens before 2026-12-03 (a vocabulary dict built once per new token)."""
    from sdcore.errors import NetworkMismatchError

    existing = [t for t in tokens if t in tokenizer.get_vocab()]
    if existing:
        raise NetworkMismatchError(f"placeholder token {existing[0]!r} already exists in the tokenizer")
    tokenizer.add_tokens(tokens)
    return [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]


def old_remove_tokens(tokenizer: Any, tokens: Iterable[str]) -> None:
    """sdcore's remove_tokens before 2026-12-03 (fast tokenizers: a JSON round trip of the whole tokenizer)."""
    from tokenizers import Tokenizer

    drop = set(tokens)
    state = json.loads(tokenizer._tokenizer.to_str())
    state["added_tokens"] = [t for t in state.get("added_tokens", []) if t.get("content") not in drop]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))


def _tokenizers() -> dict[str, Any]:
    from sdcore.models.t5 import tiny_t5_tokenizer
    from sdcore.models.tokenizer import EOS_TOKEN, OPENCLIP_PAD_TOKEN, bundled_clip_tokenizer

    return {
        "clip (SD1, SDXL 1st)": bundled_clip_tokenizer(pad_token=EOS_TOKEN),
        "openclip (SDXL 2nd)": bundled_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN),
        "t5 (tiny)": tiny_t5_tokenizer(),
    }


def _cycle(tokenizer: Any, add: Callable[..., Any], remove: Callable[..., Any]) -> Callable[[], None]:
    before = tokenizer._tokenizer.to_str()

    def run() -> None:
        add(tokenizer, TOKENS)
        remove(tokenizer, TOKENS)

    run()
    if tokenizer._tokenizer.to_str() != before:
        raise AssertionError("the tokenizer after add + remove is not the one before")
    return run


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_tokens", description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)

    import time

    import torch
    from sdcore.models import token_embeddings
    from sdcore.models.tiny import create_tiny_bundle

    rows: list[tuple[str, ...]] = []
    result: dict[str, Any] = {}
    for name, tokenizer in _tokenizers().items():
        figures = {}
        for route, add, remove in (
            ("old", old_add_tokens, old_remove_tokens),
            ("new", token_embeddings.add_tokens, token_embeddings.remove_tokens),
        ):
            _cycle(tokenizer, add, remove)()  # checks equality, then one more warm-up cycle
            adds, removes = [], []
            for _ in range(args.repeat):
                start = time.perf_counter()
                add(tokenizer, TOKENS)
                middle = time.perf_counter()
                remove(tokenizer, TOKENS)
                adds.append(middle - start)
                removes.append(time.perf_counter() - middle)
            figures[route] = {
                "add_ms": 1e3 * sorted(adds)[len(adds) // 2],
                "remove_ms": 1e3 * sorted(removes)[len(removes) // 2],
            }
        old, new = figures["old"], figures["new"]
        rows.append(
            (
                name,
                f"{old['add_ms']:.2f}",
                f"{new['add_ms']:.3f}",
                f"{old['remove_ms']:.1f}",
                f"{new['remove_ms']:.3f}",
                f"{old['remove_ms'] / new['remove_ms']:.0f}x",
            )
        )
        result[name] = figures

    # the whole cycle of one two-vector embedding on a tiny SDXL bundle (both tokenizers, both encoders)
    bundle = create_tiny_bundle("sdxl")
    widths = [e.get_input_embeddings().embedding_dim for e in bundle.text_encoders]
    vectors = [torch.zeros(len(TOKENS), w) for w in widths]
    plain = [t._tokenizer.to_str() for t in bundle.tokenizers]
    handle: dict[str, float] = {}
    for route, add, remove in (
        ("old", old_add_tokens, old_remove_tokens),
        ("new", token_embeddings.add_tokens, token_embeddings.remove_tokens),
    ):
        saved = token_embeddings.add_tokens, token_embeddings.remove_tokens
        token_embeddings.add_tokens, token_embeddings.remove_tokens = add, remove  # type: ignore[assignment]
        try:
            seconds, _ = time_call(
                lambda: token_embeddings.add_token_rows(bundle, "e", TOKENS, vectors).remove(), repeat=args.repeat
            )
        finally:
            token_embeddings.add_tokens, token_embeddings.remove_tokens = saved  # type: ignore[assignment]
        if [t._tokenizer.to_str() for t in bundle.tokenizers] != plain:
            raise AssertionError(f"{route}: the SDXL tokenizers after add + remove are not the ones before")
        handle[route] = 1e3 * seconds
    rows.append(
        (
            "SDXL add_token_rows + remove (both)",
            "-",
            "-",
            f"{handle['old']:.1f} (cycle)",
            f"{handle['new']:.3f} (cycle)",
            f"{handle['old'] / handle['new']:.0f}x",
        )
    )
    result["sdxl_cycle_ms"] = handle
    print_table(
        f"add / remove two tokens (median ms of {args.repeat})",
        rows,
        ("tokenizer", "old add", "new add", "old remove", "new remove", "remove speed-up"),
    )
    worst = max(figures["new"]["remove_ms"] for name, figures in result.items() if name != "sdxl_cycle_ms")
    print(f"goal: removal < 5 ms per tokenizer -> {'met' if worst < 5 else 'MISSED'} ({worst:.3f} ms)")
    write_json("tokens", result)
    return result


if __name__ == "__main__":
    main()
