"""NetworkSession: tag routing, prompt rewriting, exact undo (also on errors), plugin wiring."""

from __future__ import annotations

import types

import numpy as np
import pytest
import sdcore
import torch
from sdcore.errors import ConfigError, NetworkMismatchError, PluginError
from sdcore.generate.networks import Activation, PromptNetworkHandler
from sdcore.generate.pipeline import generate_images
from sdcore.generate.session import NetworkSession, handlers_from_plugin_manager


class ShiftUnet(PromptNetworkHandler):
    """Changes the UNet output: adds the ref's weight to ``conv_out.bias``."""

    tag = "test"

    def __init__(self, directory=None):
        super().__init__(directory)
        self.calls = []

    def activate(self, bundle, refs, prompt, negative_prompt):
        self.calls.append((list(refs), prompt, negative_prompt))
        bias = bundle.unet.conv_out.bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias += sum(ref.weight for ref in refs)

        def undo():
            with torch.no_grad():
                bias.copy_(saved)

        return Activation(prompt, negative_prompt, undo, {"Test hashes": ", ".join(r.name for r in refs)})


class Rewrite(PromptNetworkHandler):
    """Untagged: replaces the word 'mytoken' (like an embedding handler would)."""

    tag = None

    def __init__(self, directory=None):
        super().__init__(directory)
        self.seen = []

    def activate(self, bundle, refs, prompt, negative_prompt):
        self.seen.append((refs, prompt))
        return Activation(prompt.replace("mytoken", "cat"), negative_prompt.replace("mytoken", "dog"))


class Boom(PromptNetworkHandler):
    tag = "boom"

    def activate(self, bundle, refs, prompt, negative_prompt):
        raise RuntimeError("handler failed")


def _arr(image):
    return np.asarray(image, dtype=np.int16)


def test_handler_changes_the_image_and_undo_restores_it_bit_for_bit(sd1):
    handler = ShiftUnet()
    session = NetworkSession({"test": handler})
    state = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    before = generate_images(sd1, ["a cat"], steps=2, seed=3, networks=session)[0]
    info: list[dict[str, str]] = []
    during = generate_images(sd1, ["a cat <test:x:0.5>"], steps=2, seed=3, networks=session, info=info)[0]
    after = generate_images(sd1, ["a cat"], steps=2, seed=3, networks=session)[0]
    assert not np.array_equal(_arr(before), _arr(during))
    assert np.array_equal(_arr(before), _arr(after))
    assert all(torch.equal(v, state[k]) for k, v in sd1.unet.state_dict().items())
    # the handler saw the cleaned prompt and its refs; PNG info comes back
    refs, prompt, negative = handler.calls[-1]
    assert [(r.tag, r.name, r.weight) for r in refs] == [("test", "x", 0.5)]
    assert prompt == "a cat " and negative == ""
    assert info == [{"Test hashes": "x"}]


def test_tags_are_grouped_per_handler(sd1):
    handler = ShiftUnet()
    session = NetworkSession({"test": handler})
    original = sd1.unet.conv_out.bias.detach().clone()
    with session.apply(sd1, "<test:a:1> x <test:b:2>") as applied:
        assert applied.prompt == " x "
        assert torch.allclose(sd1.unet.conv_out.bias, original + 3)
    assert torch.equal(sd1.unet.conv_out.bias, original)
    assert len(handler.calls) == 1 and [r.name for r in handler.calls[0][0]] == ["a", "b"]


def test_batch_with_different_networks(sd1):
    session = NetworkSession({"test": ShiftUnet()})
    plain, shifted = generate_images(sd1, ["a cat", "a cat <test:x:1>"], steps=2, seed=3, networks=session)
    alone_plain = generate_images(sd1, ["a cat"], steps=2, seed=3)[0]
    alone_shifted = generate_images(sd1, ["a cat <test:x:1>"], steps=2, seed=4, networks=session)[0]
    assert np.array_equal(_arr(plain), _arr(alone_plain))
    assert np.array_equal(_arr(shifted), _arr(alone_shifted))  # second image: seed + 1


def test_unknown_tag_is_an_error_listing_known_tags(sd1):
    session = NetworkSession({"test": ShiftUnet()})
    with pytest.raises(NetworkMismatchError, match=r"<lora:style:1>.*known tags: test"):
        generate_images(sd1, ["a <lora:style:1>"], steps=1, networks=session)
    with pytest.raises(NetworkMismatchError, match="known tags: none"):
        generate_images(sd1, ["a <lora:style:1>"], steps=1)


def test_negative_prompt_tags_are_refused(sd1):
    session = NetworkSession({"test": ShiftUnet()})
    with pytest.raises(ConfigError, match="negative prompt"):
        generate_images(sd1, ["a"], negative_prompt="<test:x:1>", steps=1, networks=session)


def test_untagged_handler_rewrites_prompts(sd1):
    rewrite = Rewrite()
    shift = ShiftUnet()
    session = NetworkSession({None: rewrite, "test": shift})
    with session.apply(sd1, "a mytoken <test:x:0>", "ugly mytoken") as applied:
        assert (applied.prompt, applied.negative_prompt) == ("a cat ", "ugly dog")
    assert rewrite.seen == [([], "a mytoken ")]  # tagged handlers run first, untagged see their output
    rewritten = generate_images(sd1, ["a mytoken"], negative_prompt="mytoken", steps=2, seed=1, networks=session)[0]
    direct = generate_images(sd1, ["a cat"], negative_prompt="dog", steps=2, seed=1)[0]
    assert np.array_equal(_arr(rewritten), _arr(direct))
    # every prompt of a batch is rewritten, networks are activated once per group
    generate_images(sd1, ["mytoken a", "mytoken b"], steps=1, networks=session)
    assert [p for _, p in rewrite.seen[-2:]] == ["mytoken a", "mytoken b"]


def test_undo_runs_when_a_later_handler_fails(sd1):
    original = sd1.unet.conv_out.bias.detach().clone()
    session = NetworkSession({"test": ShiftUnet(), "boom": Boom()})
    with pytest.raises(RuntimeError, match="handler failed"):
        generate_images(sd1, ["<test:x:3> <boom:y>"], steps=1, networks=session)
    assert torch.equal(sd1.unet.conv_out.bias, original)
    # and when generation itself fails inside the block
    with pytest.raises(ValueError), NetworkSession({"test": ShiftUnet()}).apply(sd1, "<test:x:3>"):
        assert not torch.equal(sd1.unet.conv_out.bias, original)
        raise ValueError("generation failed")
    assert torch.equal(sd1.unet.conv_out.bias, original)


def test_handler_must_return_an_activation(sd1):
    class Bad(PromptNetworkHandler):
        tag = "bad"

        def activate(self, bundle, refs, prompt, negative_prompt):
            return prompt

    with pytest.raises(PluginError, match="not an Activation"), NetworkSession({"bad": Bad()}).apply(sd1, "<bad:x>"):
        pass


# --- plugin wiring ------------------------------------------------------------------------


def _pm_with(*specs):
    from sdcore.plugins import get_plugin_manager

    plugin = types.SimpleNamespace(__name__="fake_networks")

    @sdcore.hookimpl
    def sdcore_register_prompt_networks(register):
        for spec in specs:
            register(spec)

    plugin.sdcore_register_prompt_networks = sdcore_register_prompt_networks
    return get_plugin_manager(builtins=False, entrypoints=False, extra=[plugin])


HERE = __name__


def test_handlers_from_plugin_manager(tmp_path):
    pm = _pm_with(
        sdcore.PromptNetworkSpec(
            name="shift", handler=f"{HERE}:ShiftUnet", tag="test", directory_option="lora_dir", default_subdir="Lora"
        ),
        sdcore.PromptNetworkSpec(
            name="rewrite", handler=f"{HERE}:Rewrite", default_subdir="embeddings", file_suffixes=(".pt",)
        ),
    )
    handlers = handlers_from_plugin_manager(pm, {}, models_dir=tmp_path / "models", options={"aesthetic": "x"})
    assert isinstance(handlers["test"], ShiftUnet)
    assert handlers["test"].directory == tmp_path / "models" / "Lora"
    (untagged,) = handlers[None]
    assert isinstance(untagged, Rewrite) and untagged.directory == tmp_path / "models" / "embeddings"
    assert untagged.suffixes == (".pt",) and untagged.options == {"aesthetic": "x"}
    chosen = handlers_from_plugin_manager(pm, {"lora_dir": tmp_path / "mine"})
    assert chosen["test"].directory == tmp_path / "mine"
    session = NetworkSession(chosen)
    assert session.known_tags == ["test"] and len(session.untagged) == 1


def test_two_plugins_claiming_one_tag(tmp_path):
    pm = _pm_with(
        sdcore.PromptNetworkSpec(name="one", handler=f"{HERE}:ShiftUnet", tag="test"),
        sdcore.PromptNetworkSpec(name="two", handler=f"{HERE}:ShiftUnet", tag="test"),
    )
    with pytest.raises(PluginError, match="'one' and 'two'"):
        handlers_from_plugin_manager(pm)


def test_spec_must_point_at_a_handler():
    pm = _pm_with(sdcore.PromptNetworkSpec(name="bad", handler=f"{HERE}:Activation", tag="bad"))
    with pytest.raises(PluginError, match="not a PromptNetworkHandler"):
        handlers_from_plugin_manager(pm)


def test_a1111_root_folder_beside_models_dir(tmp_path):
    """A1111 keeps ``embeddings/`` in its root, beside ``models/``: with ``--models-dir webui/models`` a spec's
    ``root_subdir`` is ``webui/embeddings`` when that exists, else ``webui/models/<default_subdir>``."""
    pm = _pm_with(
        sdcore.PromptNetworkSpec(
            name="rewrite", handler=f"{HERE}:Rewrite", default_subdir="embeddings", root_subdir="embeddings"
        )
    )
    models = tmp_path / "webui" / "models"
    models.mkdir(parents=True)
    (untagged,) = handlers_from_plugin_manager(pm, {}, models_dir=models)[None]
    assert untagged.directory == models / "embeddings"  # no A1111 root folder: sdcore's (and ComfyUI's) place
    (tmp_path / "webui" / "embeddings").mkdir()
    (untagged,) = handlers_from_plugin_manager(pm, {}, models_dir=models)[None]
    assert untagged.directory == tmp_path / "webui" / "embeddings" and untagged.directory_is_default


def test_ti_embeddings_default_to_the_a1111_root(tmp_path):
    """The installed TI plugin declares A1111's root ``embeddings/`` folder."""
    from sdcore.plugins import get_plugin_manager

    (tmp_path / "embeddings").mkdir()
    handlers = handlers_from_plugin_manager(get_plugin_manager(), {}, models_dir=tmp_path / "models")
    folders = [h.directory for h in handlers[None] if h.directory_option == "embeddings_dir"]
    assert folders == [tmp_path / "embeddings"]


def test_both_embeddings_folders_are_searched_when_both_exist(tmp_path, monkeypatch):
    """``webui/embeddings`` (A1111's) and ``webui/models/embeddings`` (ComfyUI's, and sdcore's earlier default)
    both existing: the files of both are found, so an embedding kept in either one is not silently left as text.
    A relative ``--models-dir ..`` finds the root beside the folder it names, not beside the working folder."""
    pm = _pm_with(
        sdcore.PromptNetworkSpec(
            name="rewrite", handler=f"{HERE}:Rewrite", default_subdir="embeddings", root_subdir="embeddings"
        )
    )
    models = tmp_path / "webui" / "models"
    for folder, name in ((tmp_path / "webui" / "embeddings", "a1111"), (models / "embeddings", "comfy")):
        folder.mkdir(parents=True)
        (folder / f"{name}.pt").write_bytes(b"x")
    (untagged,) = handlers_from_plugin_manager(pm, {}, models_dir=models)[None]
    assert sorted(p.name for p in untagged.available()) == ["a1111.pt", "comfy.pt"]
    assert untagged.directory == tmp_path / "webui" / "embeddings"
    assert untagged.more_directories == (models / "embeddings",)
    (tmp_path / "cwd" / "inner" / "embeddings").mkdir(parents=True)  # beside the working folder: not the root
    (tmp_path / "embeddings").mkdir()  # beside --models-dir .. (= cwd): A1111's root folder
    monkeypatch.chdir(tmp_path / "cwd" / "inner")
    (untagged,) = handlers_from_plugin_manager(pm, {}, models_dir="..")[None]
    assert untagged.directory == tmp_path / "embeddings" and untagged.more_directories == ()


def test_more_subdirs_are_searched_when_they_exist(tmp_path):
    """A spec's ``more_subdirs`` are other tools' names of its folder (ComfyUI's ``models/loras`` beside A1111's
    ``models/Lora``): each that exists is searched with the default one, none existing leaves the default one
    (the folder "not found" names)."""
    pm = _pm_with(
        sdcore.PromptNetworkSpec(
            name="shift",
            handler=f"{HERE}:ShiftUnet",
            tag="test",
            directory_option="lora_dir",
            default_subdir="Lora",
            more_subdirs=("loras",),
        )
    )
    models = tmp_path / "models"
    models.mkdir()
    assert handlers_from_plugin_manager(pm, {}, models_dir=models)["test"].directory == models / "Lora"
    (models / "loras").mkdir()
    (models / "loras" / "comfy.safetensors").write_bytes(b"x")
    handler = handlers_from_plugin_manager(pm, {}, models_dir=models)["test"]
    assert handler.directory == models / "loras" and handler.directory_is_default
    assert [p.name for p in handler.available()] == ["comfy.safetensors"]
    (models / "Lora").mkdir()
    (models / "Lora" / "a1111.safetensors").write_bytes(b"x")
    handler = handlers_from_plugin_manager(pm, {}, models_dir=models)["test"]
    assert (handler.directory, handler.more_directories) == (models / "Lora", (models / "loras",))
    assert sorted(p.name for p in handler.available()) == ["a1111.safetensors", "comfy.safetensors"]
    chosen = handlers_from_plugin_manager(pm, {"lora_dir": tmp_path}, models_dir=models)["test"]
    assert (chosen.directory, chosen.more_directories) == (tmp_path, ())


def test_lora_files_in_comfyui_loras_folder_are_found(tmp_path):
    """The installed LoRA plugin reads ComfyUI's lower-case ``models/loras`` as well as A1111's ``models/Lora``:
    ``sdcore generate --models-dir ComfyUI/models "<lora:name>"`` finds the file ComfyUI lists."""
    from sdcore.plugins import get_plugin_manager

    models = tmp_path / "ComfyUI" / "models"
    (models / "loras").mkdir(parents=True)
    handlers = handlers_from_plugin_manager(get_plugin_manager(), {}, models_dir=models)
    assert handlers["lora"].directory == models / "loras" and handlers["lyco"].directory == models / "loras"


# --- networks kept between prompts (NetworkSession.keeping) -----------------------------------


class KeyedShift(ShiftUnet):
    """ShiftUnet that can say two activations are the same (its refs' names and weights), counting its undos."""

    def __init__(self, directory=None):
        super().__init__(directory)
        self.undos = 0

    def activation_key(self, refs):
        return tuple((ref.name, ref.weight) for ref in refs)

    def activate(self, bundle, refs, prompt, negative_prompt):
        activation = super().activate(bundle, refs, prompt, negative_prompt)
        undo = activation.undo

        def counted():
            self.undos += 1
            undo()

        activation.undo = counted
        return activation


def test_keeping_reuses_the_same_networks_and_undoes_on_change_and_at_the_end(sd1):
    keyed, rewrite = KeyedShift(), Rewrite()
    session = NetworkSession({"test": keyed, None: rewrite})
    original = sd1.unet.conv_out.bias.detach().clone()
    with session.keeping():
        for text in ("a mytoken <test:x:1>", "b <test:x:1>", "c <test:x:1.0>"):
            with session.apply(sd1, text) as applied:
                assert applied.info == {"Test hashes": "x"}  # the kept activation's infotext, every prompt
                assert torch.equal(sd1.unet.conv_out.bias, original + 1)
        assert (len(keyed.calls), keyed.undos) == (1, 0)  # applied once, still applied after the blocks
        assert applied.prompt == "c " and [p for _, p in rewrite.seen] == ["a mytoken ", "b ", "c "]
        assert session.kept_key == ((keyed, (("x", 1.0),)),)
        with session.apply(sd1, "<test:x:2>"):  # another weight: undone, then applied
            assert torch.equal(sd1.unet.conv_out.bias, original + 2)
        assert (len(keyed.calls), keyed.undos) == (2, 1)
        with session.apply(sd1, "no networks"):  # none: the model as it was
            assert torch.equal(sd1.unet.conv_out.bias, original)
        assert keyed.undos == 2 and session.kept_key is None
        with session.apply(sd1, "<test:x:2>"):
            pass
    assert torch.equal(sd1.unet.conv_out.bias, original) and keyed.undos == 3  # the block's end undoes


def test_keeping_needs_a_key_the_same_model_and_an_untouched_prompt(sd1):
    plain = ShiftUnet()  # no activation_key: applied and undone around every prompt, as outside keeping
    session = NetworkSession({"test": plain})
    original = sd1.unet.conv_out.bias.detach().clone()
    with session.keeping():
        for _ in range(2):
            with session.apply(sd1, "<test:x:1>"):
                pass
            assert torch.equal(sd1.unet.conv_out.bias, original)
    assert len(plain.calls) == 2

    keyed = KeyedShift()
    session = NetworkSession({"test": keyed})
    other = types.SimpleNamespace(unet=types.SimpleNamespace(conv_out=torch.nn.Conv2d(1, 4, 1)))
    other_bias = other.unet.conv_out.bias.detach().clone()
    with session.keeping():
        with session.apply(sd1, "<test:x:1>"):
            pass
        with session.apply(other, "<test:x:1>"):  # another model object: sd1 is undone first
            assert torch.equal(sd1.unet.conv_out.bias, original)
        assert len(keyed.calls) == 2
        with session.apply(other, "<test:x:1>"), session.apply(other, "<test:y:2>"):  # nested: stacked, not kept
            assert torch.equal(other.unet.conv_out.bias, other_bias + 3)
        assert torch.equal(other.unet.conv_out.bias, other_bias + 1) and session.kept_key[0][1] == (("x", 1.0),)
    assert torch.equal(other.unet.conv_out.bias, other_bias)

    class Rewriting(KeyedShift):
        def activate(self, bundle, refs, prompt, negative_prompt):
            activation = super().activate(bundle, refs, prompt, negative_prompt)
            activation.prompt = prompt + " trigger"
            return activation

    rewriting = Rewriting()
    session = NetworkSession({"test": rewriting})
    with session.keeping():
        for _ in range(2):
            with session.apply(sd1, "a <test:x:1>") as applied:
                assert applied.prompt == "a  trigger"
    assert (len(rewriting.calls), rewriting.undos) == (2, 2)  # its prompt change could not be replayed: not kept


def test_generate_images_leaves_the_model_clean_outside_keeping(sd1):
    """A training run's samples call generate_images between optimizer steps without a keeping block: each call
    must undo its networks, or a later undo would restore stale weights over the trained ones."""
    keyed = KeyedShift()
    session = NetworkSession({"test": keyed})
    state = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
    generate_images(sd1, ["a <test:x:0.5>", "b <test:x:0.5>"], steps=1, seed=2, networks=session)
    assert (len(keyed.calls), keyed.undos) == (1, 1) and session.kept_key is None
    first = generate_images(sd1, ["a <test:x:0.5>"], steps=1, seed=2, networks=session)
    assert (len(keyed.calls), keyed.undos) == (2, 2)
    assert all(torch.equal(v, state[k]) for k, v in sd1.unet.state_dict().items())
    with session.keeping():
        again = generate_images(sd1, ["a <test:x:0.5>"], steps=1, seed=2, networks=session)
        generate_images(sd1, ["c <test:x:0.5>"], steps=1, seed=5, networks=session)
        assert (len(keyed.calls), keyed.undos) == (3, 2)
    assert keyed.undos == 3 and np.array_equal(_arr(first[0]), _arr(again[0]))
    assert all(torch.equal(v, state[k]) for k, v in sd1.unet.state_dict().items())
