"""gptforge checkpoints as GGUF files for llama.cpp (and what runs on it: llama-server, Ollama, LM Studio).

The file describes llama.cpp's `gpt2` architecture, which computes what gptforge's model computes:
- Weights come from the Hugging Face GPT-2 layout (`hf_state_from_model`: vocabulary padding dropped, zero
  biases for a bias=False model, `output` only when untied) and are named by gguf's own table for it,
  as llama.cpp's convert_hf_to_gguf.py names them. Matrices are stored (out, in), which llama.cpp reads
  as {in, out}: the Conv1D transposes of the HF layout are undone.
- Types follow llama.cpp's converter: 1-d tensors (norms, biases) and the position embedding stay F32,
  the other matrices take the requested type (F32, F16, or Q8_0: int8 in blocks of 32 with one scale).
- The tokenizer becomes a byte-level BPE (`tokenizer.ggml.model` gpt2, pre-tokenizer `gpt-2`: GPT-2's
  split pattern), which reproduces gptforge's ids for the gpt2, bpe and byte kinds, and for char (each
  multi-byte character is rebuilt from its bytes by merges). Special tokens are control tokens; a chat
  tokenizer adds its template (`tokenizer.chat_template`) and <|end|> as the end-of-turn token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.common import UserError
from gptforge.export.shared import chat_template, check_output_file, require, write_file_atomically
from gptforge.interop.hf import CONV1D, LAYER_NORM_EPS, hf_state_from_model, load_language_model
from gptforge.interop.hf_tokenizer import byte_level_text, hf_tokenizer
from gptforge.model import GPT
from gptforge.options import ExportGGUFOptions
from gptforge.prompts import END_OF_TURN
from gptforge.tokenizer import Tokenizer

TYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32  # values per Q8_0 block: rows must be a multiple of it
F16_MAX = 65504.0
# GGUF cannot store an empty array and llama.cpp requires the merges key: a tokenizer without merges gets
# one between two bytes that valid UTF-8 never contains (0xC0), so it can never apply.
UNUSED_MERGE = " ".join([byte_level_text(b"\xc0")] * 2)


@dataclass
class Vocab:
    tokens: list[str]  # byte-level strings, special tokens by name, in id order
    special: list[bool]  # control tokens
    merges: list[str]  # "left right", by rank


def export_gguf_command(options: ExportGGUFOptions) -> None:
    """`gptforge export-gguf`."""
    out = export_gguf(Path(options.checkpoint), Path(options.out), weight_type=options.type, force=options.force)
    print(f"exported {options.checkpoint} -> {out} ({options.type}, {out.stat().st_size / 1e6:.1f} MB; run it with "
          "llama.cpp)")


def export_gguf(checkpoint: Path, out: Path, weight_type: str = "f32", force: bool = False) -> Path:
    """Write `out` (one .gguf file) for llama.cpp. weight_type: f32, f16 or q8_0. Atomic: a failed export leaves no
    file behind and an earlier one unchanged."""
    if weight_type not in TYPES:
        raise UserError(f"unknown --type {weight_type!r}; use f32, f16 or q8_0")
    gguf = require("gguf", "export-gguf")
    out = check_output_file(out, force)
    model, tokenizer = load_language_model(Path(checkpoint), "export-gguf")
    vocab = gguf_vocab(tokenizer)  # an unsupported tokenizer is refused before the weights are converted
    tensors = gguf_tensors(gguf, model, weight_type)
    write_file_atomically(out, lambda tmp: _write(gguf, tmp, model, tokenizer, vocab, tensors, weight_type,
                                                  name=Path(checkpoint).resolve().name))
    return out


# --- weights -----------------------------------------------------------------------------------------
def gguf_tensors(gguf, model: GPT, weight_type: str) -> list[tuple[str, np.ndarray, object]]:
    """(name, data, GGML type) of every tensor llama.cpp's gpt2 graph reads, converted to `weight_type`."""
    cfg = model.config
    if weight_type == "q8_0" and cfg.n_embd % Q8_BLOCK:
        raise UserError(f"q8_0 stores rows in blocks of {Q8_BLOCK} values, and this model's rows of n_embd="
                        f"{cfg.n_embd} are not a multiple of {Q8_BLOCK}; use --type f16 or f32")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    tensors = []
    for hf_name, t in hf_state_from_model(model).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if any(hf_name.endswith(f".{m}.weight") for m in CONV1D):
            t = t.t()  # Conv1D (in, out) -> (out, in)
        data = t.detach().float().contiguous().numpy()
        qtype = _tensor_type(gguf, name, data.ndim, weight_type)
        tensors.append((name, *_convert(gguf, name, data, qtype)))
    return tensors


def _tensor_type(gguf, name: str, ndim: int, weight_type: str):
    T = gguf.GGMLQuantizationType
    if ndim == 1 or name.startswith("position_embd") or weight_type == "f32":
        return T.F32  # as llama.cpp's converter: norms, biases and positions stay F32
    return {"f16": T.F16, "q8_0": T.Q8_0}[weight_type]


def _convert(gguf, name: str, data: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    T = gguf.GGMLQuantizationType
    if qtype != T.F32:
        # F16 stores values, Q8_0 its per-block scales, as float16: both overflow beyond its range
        biggest = float(np.abs(data).max()) / (127.0 if qtype == T.Q8_0 else 1.0)
        if biggest > F16_MAX:
            raise UserError(f"tensor {name} holds values beyond float16's range (max |w| = "
                            f"{float(np.abs(data).max()):.4g}); export it with --type f32")
    if qtype == T.Q8_0:
        return gguf.quants.quantize(data, qtype), qtype
    return data.astype(np.float16 if qtype == T.F16 else np.float32), qtype


# --- tokenizer ---------------------------------------------------------------------------------------
def gguf_vocab(tok: Tokenizer) -> Vocab:
    """The tokenizer as llama.cpp's byte-level BPE with GPT-2's pre-tokenizer; anything it would tokenize
    differently is refused here, with the reason."""
    if tok.kind == "char":
        tokens, merges = _char_vocab(tok.chars)
    else:  # gpt2, bpe, byte: a byte-level BPE in the `tokenizers` library's terms
        tokens, merges = _bpe_vocab(json.loads(hf_tokenizer(tok).to_str()), tok.kind)
    specials = sorted(tok.special_tokens, key=tok.special_tokens.get)
    return Vocab(tokens=tokens + specials, special=[False] * len(tokens) + [True] * len(specials),
                 merges=merges or [UNUSED_MERGE])


def _bpe_vocab(data: dict, kind: str) -> tuple[list[str], list[str]]:
    """Ordinary tokens and merges of a `tokenizers` byte-level BPE, checked to be what llama.cpp's gpt-2
    pre-tokenizer and BPE compute: no normalizer, GPT-2's split pattern, plain merges by rank."""
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}

    def refuse(why: str) -> UserError:
        return UserError(f"this {kind} tokenizer {why}, which llama.cpp's gpt-2 tokenizer would not reproduce; "
                         "re-train with --data.tokenizer bpe (or gpt2, byte) to export it")

    if data.get("normalizer") is not None:
        raise refuse("normalizes text")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise refuse(f"pre-tokenizes with {pre.get('type', 'nothing')} rather than GPT-2's byte-level split")
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("ignore_merges") or model.get("byte_fallback"):
        raise refuse("uses BPE options (dropout, prefixes, suffixes, ignore_merges or byte fallback)")
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise refuse("has gaps in its ids")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, merges


def _char_vocab(chars: list[str]) -> tuple[list[str], list[str]]:
    """One token per character, written as its UTF-8 bytes; merges join the bytes of each multi-byte
    character, shortest prefix first (a lead byte followed by its continuation bytes only occurs inside
    that character, so no merge can join two characters)."""
    encoded = [c.encode("utf-8") for c in chars]
    merges: dict[str, None] = {}
    for length in range(2, 5):
        for b in encoded:
            if len(b) >= length:
                merges[f"{byte_level_text(b[:length - 1])} {byte_level_text(b[length - 1:length])}"] = None
    return [byte_level_text(b) for b in encoded], list(merges)


# --- the file ----------------------------------------------------------------------------------------
def _write(gguf, path: Path, model: GPT, tok: Tokenizer, vocab: Vocab, tensors, weight_type: str, name: str) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    w.add_name(name)
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(4 * cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_layer_norm_eps(LAYER_NORM_EPS)
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
    w.add_file_type(getattr(gguf.LlamaFileType, file_types[weight_type]))
    if weight_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab.tokens)
    T = gguf.TokenType
    w.add_token_types([T.CONTROL if s else T.NORMAL for s in vocab.special])
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(tok.eot_id)  # gptforge starts an empty prompt with <|endoftext|>, never adds one
    w.add_eos_token_id(tok.eot_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if tok.has_chat_template:
        w.add_eot_token_id(tok.special_tokens[END_OF_TURN])
        w.add_chat_template(chat_template())

    for tensor_name, data, qtype in tensors:
        w.add_tensor(tensor_name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
