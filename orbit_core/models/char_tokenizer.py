"""An offline character-level tokenizer, saved in the HF format AutoTokenizer reads."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")
# multi-character pieces kept whole so a boxed answer is a few tokens
PIECES = ("\\boxed{",)


def build_char_tokenizer(alphabet: str, path: str | None = None) -> PreTrainedTokenizerFast:
    """Tokens: specials, whole pieces, then each character of ``alphabet``. Saved to ``path`` if given."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *PIECES, *dict.fromkeys(alphabet)):
        vocab.setdefault(token, len(vocab))
    pattern = "|".join(piece.replace("\\", "\\\\").replace("{", "\\{") for piece in PIECES) + "|."
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<pad>",
    )
    if path is not None:
        fast.save_pretrained(path)
    return fast
