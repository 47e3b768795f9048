"""`vico export`: each format read back the way its tool reads it gives the concept's embedding exactly;
what does not transfer is said; bad input is one line naming the argument or file."""

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from safetensors.torch import load_file, save_file  # noqa: E402

from tests.builders import error_line, vico as run, vico_train as train  # noqa: E402
from vico import export  # noqa: E402
from vico.methods import available_methods  # noqa: E402

EXPORTED = ("textual-inversion", "vico", "attndreambooth")


@pytest.fixture(scope="module")
def concepts(model_dir, images_dir, tmp_path_factory) -> dict[str, Path]:
    """A concept of every method, trained two steps (every stage's, for AttnDreamBooth) on the tiny model."""
    root = tmp_path_factory.mktemp("concepts")
    for method in available_methods():
        assert train(model_dir, images_dir, root / method, "--method", method, "--steps", 2) == 0
    return {method: root / method for method in available_methods()}


def learned(concept: Path) -> torch.Tensor:
    """The concept's own embedding [1, dim], read without vico's readers."""
    return load_file(concept / "concept.safetensors")["embedding"]


def export_to(concept: Path, fmt: str, out: Path) -> int:
    return run("export", "--concept", concept, "--format", fmt, "--out", out)


# --- the tools' readers, mirrored from their source ------------------------------------------------------------

def a1111_load_from_file(path: Path) -> tuple[str, torch.Tensor]:
    """The reading part of AUTOMATIC1111/stable-diffusion-webui modules/textual_inversion/textual_inversion.py,
    ``EmbeddingDatabase.load_from_file`` (commit 22ecb78b51f7e6f0234cbc0efbde4ee9a2dc466f), for a .safetensors
    file: the name is the file's; the branch taken must be the "diffuser concepts" one."""
    import safetensors.torch

    name, ext = os.path.splitext(path.name)
    assert ext.upper() == ".SAFETENSORS"  # any other extension is read by torch.load or skipped
    data = safetensors.torch.load_file(path, device="cpu")
    assert "string_to_param" not in data  # the .pt branch
    assert not ("clip_g" in data and "clip_l" in data)  # the SDXL branch
    assert type(data) is dict and type(next(iter(data.values()))) is torch.Tensor  # "diffuser concepts"
    assert len(data.keys()) == 1, "embedding file has multiple terms in it"
    emb = next(iter(data.values()))
    if len(emb.shape) == 1:
        emb = emb.unsqueeze(0)
    return name, emb.detach().to(dtype=torch.float32)  # vec; vec.shape[-1] is its shape, vec.shape[0] vectors


def comfyui_load_embed(prompt_name: str, folder: Path, embedding_size: int, embed_key: str = "clip_l"):
    """comfyanonymous/ComfyUI comfy/sd1_clip.py ``load_embed`` (commit b55c2247654476fbc744e572ba7a834fd9378745)
    for `embedding:NAME` in a prompt and a .safetensors file, then ``SDTokenizer.tokenize_with_weights`` (one
    token per row) and ``SDClipModel.set_up_textual_embeddings`` (a row of another width is dropped)."""
    import safetensors.torch

    path = folder / prompt_name
    if not path.is_file():
        path = next(folder / (prompt_name + x) for x in [".safetensors", ".pt", ".bin"]
                    if (folder / (prompt_name + x)).is_file())
    assert path.name.lower().endswith(".safetensors")
    embed = safetensors.torch.load_file(path, device="cpu")
    assert "string_to_param" not in embed and not isinstance(embed, list) and embed_key not in embed
    assert not any(k.startswith("bundle_emb.") for k in embed)  # bundled_embed finds nothing
    embed_out = next(iter(embed.values()))
    rows = [embed_out] if len(embed_out.shape) == 1 else [embed_out[x] for x in range(embed_out.shape[0])]
    return torch.stack([y for y in rows if y.shape[0] == embedding_size])


# --- each format, as its tool reads it --------------------------------------------------------------------------

@pytest.mark.parametrize("method", EXPORTED)
def test_a1111_reads_the_learned_embedding(concepts, method, tmp_path):
    out = tmp_path / "embeddings" / "my-cat.safetensors"
    out.parent.mkdir()
    assert export_to(concepts[method], "a1111", out) == 0
    name, vec = a1111_load_from_file(out)
    want = learned(concepts[method])
    assert name == "my-cat" and want.dtype == torch.float32 and list(want.shape) == [1, 32]
    assert torch.equal(vec, want)
    assert load_file(out)["emb_params"].dtype == want.dtype


@pytest.mark.parametrize("method", EXPORTED)
def test_comfyui_reads_the_learned_embedding(concepts, method, tmp_path):
    out = tmp_path / "my-cat.safetensors"
    assert export_to(concepts[method], "comfyui", out) == 0
    want = learned(concepts[method])
    got = comfyui_load_embed("my-cat", tmp_path, embedding_size=want.shape[-1])
    assert got.dtype == want.dtype and list(got.shape) == [1, 32]
    assert torch.equal(got, want)


@pytest.mark.parametrize("method", EXPORTED)
def test_diffusers_load_textual_inversion_gets_the_learned_embedding(concepts, model_dir, method, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "cat.safetensors"
    assert export_to(concepts[method], "diffusers", out) == 0
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    cat = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("cat")].clone()
    pipe.load_textual_inversion(str(out))  # the token is the file's only key
    token_id = pipe.tokenizer.convert_tokens_to_ids("S*")
    row = pipe.text_encoder.get_input_embeddings().weight[token_id]
    want = learned(concepts[method])
    assert token_id not in (None, pipe.tokenizer.unk_token_id) and row.dtype == want.dtype
    assert torch.equal(row[None], want)
    assert not torch.equal(want[0], cat), "two training steps moved the embedding away from its init word"
    assert list(load_file(out)["S*"].shape) == [1, 32]
    if method != "attndreambooth":  # what Textual Inversion and ViCo write at training time is the same layout
        assert load_file(out).keys() == load_file(concepts[method] / "learned_embeds.safetensors").keys()
        assert torch.equal(load_file(concepts[method] / "learned_embeds.safetensors")["S*"], want)


def test_what_does_not_transfer_is_said_once_on_stderr(concepts, tmp_path, capsys):
    expected = {"textual-inversion": None, "vico": "ViCo's image attention blocks",
                "attndreambooth": "AttnDreamBooth's fine-tuned UNet"}
    for method, words in expected.items():
        assert export_to(concepts[method], "a1111", tmp_path / f"{method}.safetensors") == 0
        captured = capsys.readouterr()
        assert f"write '{method}" in captured.out  # how to use it, the file's name as the word
        notes = [line for line in captured.err.splitlines() if line.startswith("vico export:")]
        assert (notes == []) if words is None else (len(notes) == 1 and words in notes[0]), notes


def test_every_method_is_exported_or_refused():
    assert set(export.EXPORTABLE) | set(export.NOT_EXPORTABLE) == set(available_methods())
    assert not set(export.EXPORTABLE) & set(export.NOT_EXPORTABLE)


def test_sdxl_layout_has_one_key_per_text_encoder():
    clip_l, clip_g = torch.zeros(1, 768), torch.ones(1, 1280)
    assert export.tool_tensors("a1111", "S*", [clip_l, clip_g]).keys() == {"clip_l", "clip_g"}
    with pytest.raises(ValueError, match="one per file"):
        export.tool_tensors("diffusers", "S*", [clip_l, clip_g])


# --- bad input --------------------------------------------------------------------------------------------------

def test_catversion_is_refused_in_one_line(concepts, tmp_path, capsys):
    out = tmp_path / "cv.safetensors"
    assert export_to(concepts["catversion"], "comfyui", out) == 2
    assert "CatVersion learns key/value prefixes" in error_line(capsys) and not out.exists()


def test_a_missing_concept_folder_is_one_line(tmp_path, capsys):
    assert export_to(tmp_path / "nothing", "a1111", tmp_path / "e.safetensors") == 2
    assert f"{tmp_path / 'nothing'} is not a trained concept" in error_line(capsys)


@pytest.mark.parametrize("damage, words", [
    (lambda c: (c / "concept.safetensors").write_bytes(b"\x00" * 40), "concept.safetensors is unreadable"),
    (lambda c: save_file({"embedding": torch.full((1, 32), float("nan"))}, str(c / "concept.safetensors")),
     "holds NaN or inf"),
    (lambda c: save_file({"other": torch.zeros(1, 32)}, str(c / "concept.safetensors")), "no tensor 'embedding'"),
    (lambda c: (c / "concept.json").write_text("{"), "concept.json is not valid JSON"),
])
def test_a_damaged_concept_is_one_line_naming_the_file(concepts, tmp_path, capsys, damage, words):
    concept = tmp_path / "concept"
    shutil.copytree(concepts["textual-inversion"], concept)
    damage(concept)
    out = tmp_path / "e.safetensors"
    assert export_to(concept, "diffusers", out) == 2
    assert words in error_line(capsys) and not out.exists()


def test_an_unknown_format_is_refused_by_the_parser(concepts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_to(concepts["vico"], "invokeai", tmp_path / "e.safetensors")
    assert exc.value.code == 2 and "--format: invalid choice: 'invokeai'" in capsys.readouterr().err


@pytest.mark.parametrize("out, fmt, words", [
    ("missing/e.safetensors", "a1111", "does not exist"),
    ("e.pt", "a1111", "name it NAME.safetensors"),
    ("my cat.safetensors", "comfyui", "without spaces"),
])
def test_a_bad_out_is_one_line_naming_it(concepts, tmp_path, capsys, out, fmt, words):
    assert export_to(concepts["vico"], fmt, tmp_path / out) == 2
    line = error_line(capsys)
    assert f"--out {tmp_path / out}" in line and words in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_out_replaces_only_an_earlier_export(concepts, tmp_path, capsys):
    foreign = tmp_path / "theirs.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(foreign))  # an embedding another tool wrote
    assert export_to(concepts["vico"], "a1111", foreign) == 2
    assert "was not written by vico export" in error_line(capsys)
    assert torch.equal(load_file(foreign)["emb_params"], torch.zeros(1, 32))

    ours = tmp_path / "ours.safetensors"
    assert export_to(concepts["vico"], "a1111", ours) == 0
    assert export_to(concepts["attndreambooth"], "diffusers", ours) == 0  # vico's own: replaced
    assert torch.equal(load_file(ours)["S*"], learned(concepts["attndreambooth"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "theirs.safetensors"]
