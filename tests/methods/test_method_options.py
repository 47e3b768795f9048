"""Each method's typed options (``Method.Options``): the flags made from them, their checks, and how a concept
saves and restores them."""

from __future__ import annotations

import json

import pytest

from tests import builders as tiny
from vico import cli
from vico.methods import available_methods, get_method, load_method
from vico.methods.attndreambooth import AttnDreamBoothOptions
from vico.methods.base import MethodConfig, MethodOptions, method_options, option_flag
from vico.methods.catversion import CatVersionOptions
from vico.methods.vico import ViCoOptions
from vico.model import Components, UnreadableFile, UserError


def help_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit):
        cli.main(["train", *argv, "--help"])
    return capsys.readouterr().out


def test_help_for_one_method_lists_its_options_with_defaults_and_no_others(capsys):
    text = help_of(capsys, "--method", "vico")
    assert "--method vico options:" in text and "--reg-weight REG_WEIGHT" in text and "(default 0.0005)" in text
    assert "--layers MODULE [MODULE ...]" in text
    assert "--fast" not in text and "--prefix-layers" not in text and "--rotate-p" not in text
    text = help_of(capsys, "--method=attndreambooth")
    assert "--fast, --no-fast" in text and "(default 0.75)" in text and "--reg-weight" not in text


def test_help_without_a_method_lists_every_method_s_options_and_the_choices(capsys):
    text = help_of(capsys)
    for name, cls in available_methods().items():
        assert f"{{{','.join(available_methods())}}}" in text.replace("\n", "").replace(" ", "")
        for f in cls.Options.__dataclass_fields__:
            assert option_flag(f) in text, (name, f)


def test_an_unknown_method_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "m", "--images", "i", "--out", "o", "--method", "dreambooth"])
    assert "argument --method: invalid choice: 'dreambooth'" in capsys.readouterr().err


@pytest.mark.parametrize("method, given, message", [
    ("vico", {"fast": True}, "--fast is not an option of --method vico (its options: --layers, --reg-weight)"),
    ("textual-inversion", {"layers": ["a"]}, "--layers is not an option of --method textual-inversion (its options: "
                                             "none)"),
    ("vico", {"reg_weight": "high"}, "--reg-weight 'high': expected a finite number"),
    ("vico", {"reg_weight": float("nan")}, "--reg-weight nan: expected a finite number"),
    ("vico", {"layers": "up_blocks.1"}, "--layers 'up_blocks.1': expected a list of text or nothing"),
    ("vico", {"layers": []}, "--layers: name at least one spatial transformer"),
    ("attndreambooth", {"fast": 1}, "--fast 1: expected true or false"),
    ("attndreambooth", {"rotate_p": -0.1}, "--rotate-p -0.1: a probability must be in [0, 1]"),
    ("attndreambooth", {"unet_lora_rank": -1}, "--unet-lora-rank -1: a rank must be 0 (full fine-tuning) or more"),
    ("attndreambooth", {"unet_lora_rank": 2.5}, "--unet-lora-rank 2.5: expected a whole number"),
    ("catversion", {"prefix_layers": []}, "--prefix-layers: name at least one text-encoder attention module"),
])
def test_bad_options_are_one_line_naming_the_flag(method, given, message):
    with pytest.raises(UserError) as err:
        method_options(get_method(method), given)
    assert str(err.value) == message


def test_options_of_another_method_are_refused():
    with pytest.raises(UserError, match="ViCoOptions are not options of catversion"):
        method_options(get_method("catversion"), ViCoOptions())


def test_options_given_by_name_are_typed_with_the_defaults_filled_in():
    options = method_options(get_method("vico"), {"reg_weight": 0})
    assert options == ViCoOptions(layers=None, reg_weight=0)
    assert method_options(get_method("attndreambooth"), {}) == AttnDreamBoothOptions(fast=False, rotate_p=0.75)
    assert type(method_options(get_method("textual-inversion"), {})) is MethodOptions


@pytest.mark.parametrize("saved, message", [
    ({"layers": "up_blocks"}, "config.options.layers must be a list of text or nothing, got 'up_blocks'"),
    ({"reg_weight": -1}, "config.options: --reg-weight -1: a weight must be 0 or more"),
    ({"fast": True}, "config.options.fast is not an option of vico (it has layers, reg_weight)"),
])
def test_saved_options_are_checked_naming_the_file_and_field(tmp_path, saved, message):
    with pytest.raises(UnreadableFile) as err:
        ViCoOptions.from_saved(saved, tmp_path / "concept.json", "vico")
    assert str(err.value) == f"{tmp_path / 'concept.json'}: {message}"


def test_a_saved_concept_restores_its_options(tmp_path):
    comps = Components(path="<tiny>", **tiny.make_tiny_components(0))
    chosen = ["text_model.encoder.layers.0.self_attn"] if any(
        n.startswith("text_model.") for n, _ in comps.text_encoder.named_modules()) else ["encoder.layers.0.self_attn"]
    method = get_method("catversion")(comps, MethodConfig(init_word="cat", resolution=32,
                                                          options=CatVersionOptions(prefix_layers=chosen)))
    method.save(tmp_path / "concept")
    assert json.loads((tmp_path / "concept" / "concept.json").read_text())["config"]["options"] == {
        "prefix_layers": chosen}
    loaded = load_method(Components(path="<tiny>", **tiny.make_tiny_components(0)), tmp_path / "concept")
    assert loaded.options == CatVersionOptions(prefix_layers=chosen) and list(loaded.prefix) == chosen


def test_catversion_defaults_record_the_layers_they_chose(tmp_path):
    comps = Components(path="<tiny>", **tiny.make_tiny_components(0))
    method = get_method("catversion")(comps, MethodConfig(init_word="cat", resolution=32))
    assert method.options.prefix_layers == list(method.prefix) and len(method.prefix) >= 1
