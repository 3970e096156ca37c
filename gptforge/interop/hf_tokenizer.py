"""gptforge tokenizers as transformers loads them (tokenizer.json + tokenizer_config.json), and back.

Export, per kind (every one loads as a PreTrainedTokenizerFast around a `tokenizers` object):
    gpt2  byte-level BPE with GPT-2's vocabulary and merges, rebuilt from tiktoken's ranks
    bpe   the trained `tokenizers` object itself
    byte  byte-level BPE with 256 tokens (id = byte value) and no merges
    char  a WordLevel model over single characters: text is split into code points, one token each
Special tokens (<|endoftext|> and any others) are added at their gptforge ids; eos = bos = <|endoftext|>.
The ids of ordinary text are identical to gptforge's for all four kinds (tested). One deliberate
difference: transformers turns a special token's *string* typed in the text into the special token (its
usual convention), where gptforge's `encode` keeps such text ordinary; special ids otherwise agree.

The exact gptforge tokenizer is also stored in `gptforge_tokenizer/`, so importing an exported folder
back restores it as it was, whatever its kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from gptforge.common import UserError
from gptforge.files import MAX_TOKENIZER_BYTES, read_json
from gptforge.tokenizer import (EOT, TOKENIZER_FILE, BPETokenizer, GPT2Tokenizer, Tokenizer, _bytes_to_unicode,
                                load_tokenizer)

SIDECAR = "gptforge_tokenizer"
HF_TOKENIZER, HF_TOKENIZER_CONFIG, HF_SPECIAL_MAP = "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
_BYTE_TO_UNICODE = _bytes_to_unicode()  # GPT-2's byte -> printable character table (byte-level BPE's alphabet)
_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}


def byte_level_text(token: bytes) -> str:
    """Bytes as a byte-level BPE writes them (GPT-2's printable stand-in for each byte)."""
    return "".join(_BYTE_TO_UNICODE[b] for b in token)


# --- export ------------------------------------------------------------------------------------------
def hf_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` giving `tok`'s ids, with its special tokens at their gptforge ids."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer

    if tok.kind == "gpt2":
        core = _gpt2_core(tok)
    elif tok.kind == "bpe":
        core = HFTokenizer.from_str(tok.tk.to_str())
    elif tok.kind == "byte":
        core = _byte_level_bpe({byte_level_text(bytes([b])): b for b in range(256)}, [])
    elif tok.kind == "char":
        core = _char_core(tok.chars)
    else:
        raise UserError(f"cannot export a '{tok.kind}' tokenizer for transformers (gpt2, bpe, byte and char "
                        "are supported)")
    specials = sorted(tok.special_tokens.items(), key=lambda item: item[1])
    core.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    for name, i in specials:
        if core.token_to_id(name) != i:  # e.g. a trained BPE that learned "<|endoftext|>" as ordinary text
            raise UserError(f"special token {name!r} cannot keep id {i} in the exported tokenizer, because the "
                            f"vocabulary already holds that string as token {core.token_to_id(name)}")
    return core


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    core = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    # use_regex (the default) is GPT-2's pre-tokenization pattern, the one tiktoken's gpt2 encoding uses
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return core


def _gpt2_core(tok: GPT2Tokenizer):
    token_bytes = [tok.enc.decode_single_token_bytes(i) for i in range(tok.base_vocab_size)]
    merges = [(byte_level_text(a), byte_level_text(b)) for a, b in merges_from_ranks(token_bytes)]
    return _byte_level_bpe({byte_level_text(t): i for i, t in enumerate(token_bytes)}, merges)


def merges_from_ranks(token_bytes: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list behind tiktoken-style ranks (token i has rank i): each multi-byte token is the
    merge of the two parts that BPE, using only lower-ranked merges, leaves it in. Ordered by rank, as
    transformers' merges are; for GPT-2 this reproduces OpenAI's vocab.bpe line for line (tested)."""
    ranks = {t: i for i, t in enumerate(token_bytes)}
    merges = []
    for rank, token in enumerate(token_bytes):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                raise UserError(f"token {token!r} cannot be built by lower-ranked merges; not a BPE vocabulary")
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def _char_core(chars: list[str]):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    core = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every code point
    core.decoder = decoders.Fuse()  # join the characters back without spaces
    return core


def save_hf_tokenizer(tok: Tokenizer, folder: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and the exact gptforge tokenizer."""
    hf_tokenizer(tok).save(str(folder / HF_TOKENIZER))
    specials = {"bos_token": EOT, "eos_token": EOT}
    others = [name for name in sorted(tok.special_tokens, key=tok.special_tokens.get) if name != EOT]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        **specials, "additional_special_tokens": others,
        # transformers would otherwise "clean up" spaces before punctuation when decoding
        "clean_up_tokenization_spaces": False,
        "gptforge_tokenizer": tok.describe(),
    }
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / HF_SPECIAL_MAP).write_text(json.dumps({**specials, "additional_special_tokens": others},
                                                    indent=2, ensure_ascii=False) + "\n")
    tok.save(folder / SIDECAR)


# --- import ------------------------------------------------------------------------------------------
def tokenizer_from_hf_folder(folder: Path) -> Optional[Tokenizer]:
    """The gptforge tokenizer a Hugging Face folder carries: the exact one an export stored, else its
    tokenizer.json when that is a byte-level BPE (GPT-2's own becomes the gpt2 kind). None when there is
    no tokenizer gptforge can represent; the caller decides what then."""
    if (folder / SIDECAR / TOKENIZER_FILE).is_file():
        return load_tokenizer(folder / SIDECAR)
    path = folder / HF_TOKENIZER
    if not path.is_file():
        return None
    data = read_json(path, root=folder, max_bytes=MAX_TOKENIZER_BYTES)
    try:
        return _from_byte_level_bpe(data)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise UserError(f"{path} is corrupt or not a tokenizers file; delete it or pass --tokenizer") from None


def _from_byte_level_bpe(data: dict) -> Optional[Tokenizer]:
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data):
        return None
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab = {token: i for token, i in model["vocab"].items() if token not in specials}  # HF's gpt2 lists eot in both
    n = len(vocab)
    names = sorted(specials, key=specials.get)
    # gptforge's layout: ordinary tokens 0..n-1, then the specials, <|endoftext|> among them
    if sorted(vocab.values()) != list(range(n)) or sorted(specials.values()) != list(range(n, n + len(names))):
        return None
    if n < 256 or EOT not in specials or any(c not in _UNICODE_TO_BYTE for token in vocab for c in token):
        return None
    if n == 50256 and data.get("normalizer") is None:
        gpt2 = GPT2Tokenizer(names)
        by_id = sorted(vocab, key=vocab.get)
        if all(byte_level_text(gpt2.enc.decode_single_token_bytes(i)) == t for i, t in enumerate(by_id)):
            return gpt2  # GPT-2's vocabulary (hence its merges): use tiktoken, gptforge's gpt2 kind
    from tokenizers import Tokenizer as HFTokenizer

    # specials live in gptforge's wrapper, not in the library's model (see BPETokenizer)
    core = {**data, "added_tokens": [], "post_processor": None, "model": {**model, "vocab": vocab}}
    return BPETokenizer(HFTokenizer.from_str(json.dumps(core)), names)


def _is_byte_level(data: dict) -> bool:
    def types(component: Optional[dict], nested: str) -> set[str]:
        if not component:
            return set()
        return {component.get("type")} | {c.get("type") for c in component.get(nested) or []}

    return "ByteLevel" in types(data.get("pre_tokenizer"), "pretokenizers") and \
        "ByteLevel" in types(data.get("decoder"), "decoders")
