"""A word-level tokenizer with CLIP's special tokens, saved and loaded like SD's CLIP tokenizer.

The toy world's text encoder reads words, not BPE pieces: one token per word,
BOS/EOT as CLIP's, padded to 77 with EOT. ``save_pretrained`` writes it and
``from_pretrained`` (``StableDiffusionPipeline``) loads it back.
"""

from __future__ import annotations

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def make_tokenizer(words):
    """A word-level fast tokenizer with CLIP's special tokens, padded to 77 with EOT (like SD's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL) + ["<unk>"] + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", model_max_length=77,
    )
