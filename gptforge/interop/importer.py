"""`import-gpt2`: OpenAI / Hugging Face GPT-2 weights -> a normal gptforge checkpoint directory.

SOURCE is, in this order of checking:
    an existing folder   Hugging Face layout (config.json + model.safetensors or pytorch_model.bin, maybe
                         sharded) or OpenAI's TensorFlow checkpoint (hparams.json, checkpoint, model.ckpt.*)
    a model id           gpt2, gpt2-medium, gpt2-large, gpt2-xl, openai-community/..., fetched with
                         huggingface_hub (config, safetensors and tokenizer files only)
Both readers hand over HF-layout weights, converted once by `hf.state_from_hf`.

The tokenizer: `tokenizer=` when given (gpt2, byte, or a saved gptforge tokenizer / checkpoint folder),
else the one the folder carries (an export's exact gptforge tokenizer, or a byte-level BPE tokenizer.json),
else GPT-2's own when the vocabulary has GPT-2's 50257 tokens. Anything else is refused: a model whose
ids mean something else than the tokenizer's would import "fine" and talk nonsense.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from gptforge.checkpoint import MODEL_CONFIG, TOKENIZER_DIR, refuse_to_replace, save_checkpoint
from gptforge.common import UserError
from gptforge.interop.hf import (SAFETENSORS, WEIGHT_FILES, is_hf_folder, model_config_from_hf, model_from_state,
                                 read_hf_folder, state_from_hf)
from gptforge.interop.hf_tokenizer import tokenizer_from_hf_folder
from gptforge.interop.openai_tf import is_openai_folder, read_openai_folder
from gptforge.options import ImportOptions
from gptforge.tokenizer import GPT2Tokenizer, Tokenizer, build_tokenizer, load_tokenizer

GPT2_VOCAB = 50257
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# What a GPT-2 repository needs; its TF/Flax/ONNX/tflite copies are left on the Hub.
HUB_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json"]
HUB_BIN_FILES = ["config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer.json"]


def import_command(options: ImportOptions) -> None:
    """`gptforge import-gpt2`."""
    out = import_gpt2(options.source, Path(options.out), tokenizer=options.tokenizer, revision=options.revision)
    print(f"imported {options.source} -> {out}")


def import_gpt2(source: str, out: Path, tokenizer: Optional[str] = None, revision: Optional[str] = None) -> Path:
    """Convert GPT-2 weights from `source` into a checkpoint directory at `out` (written atomically)."""
    out = Path(out)
    refuse_to_replace(out, (MODEL_CONFIG,), "a gptforge checkpoint")
    folder = locate_source(source, revision)
    if is_openai_folder(folder):
        layout, (hf_config, hf_state) = "openai-tf", read_openai_folder(folder)
        where = str(folder / "hparams.json")
    elif is_hf_folder(folder):
        layout, (hf_config, hf_state) = "huggingface", read_hf_folder(folder)
        where = str(folder / "config.json")
    else:
        raise UserError(f"{folder} is neither a Hugging Face model folder (config.json + {SAFETENSORS}) nor an "
                        "OpenAI checkpoint folder (hparams.json + model.ckpt.*)")
    config = model_config_from_hf(hf_config, where)
    tok = pick_tokenizer(tokenizer, folder if layout == "huggingface" else None, config.vocab_size, source)
    model = model_from_state(config, state_from_hf(hf_state, config, where))
    save_checkpoint(out, model, tok, extra_meta={"imported_from": source, "source_layout": layout,
                                                 "revision": revision})
    return out


def locate_source(source: str, revision: Optional[str] = None) -> Path:
    """A local folder as given, or a Hub model id downloaded into huggingface_hub's cache."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{source} is a file; pass the folder that holds config.json (or hparams.json)")
        return path
    if not HUB_ID.fullmatch(source) or source.startswith((".", "~")):
        raise UserError(f"folder not found: {source}; pass an existing model folder or a Hugging Face model id "
                        "such as gpt2")
    return download(source, revision)


def download(repo_id: str, revision: Optional[str] = None) -> Path:
    """Fetch config, weights and tokenizer of a Hub GPT-2 (safetensors, else pytorch_model.bin)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
        if not any((folder / name).is_file() for name in WEIGHT_FILES):
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_BIN_FILES))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # offline, unknown repo, gated repo, bad revision: many types, one answer
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:120]
        raise UserError(f"could not download '{repo_id}' from the Hugging Face Hub ({reason}), and no local folder "
                        "has that name; check the name and network, or download the model elsewhere and pass its "
                        "local folder (config.json + model.safetensors)") from None
    return folder


def pick_tokenizer(spec: Optional[str], hf_folder: Optional[Path], vocab_size: int, source: str) -> Tokenizer:
    """The tokenizer the imported checkpoint carries (see the module docstring), matched to the vocabulary."""
    if spec:
        tok, origin = tokenizer_from_spec(spec), f"--tokenizer {spec}"
    elif hf_folder is not None and (found := tokenizer_from_hf_folder(hf_folder)) is not None:
        tok, origin = found, f"the tokenizer in {hf_folder}"
    elif vocab_size == GPT2_VOCAB:
        tok, origin = GPT2Tokenizer(), "GPT-2's tokenizer"
    else:
        raise UserError(f"{source} has {vocab_size} tokens, not GPT-2's {GPT2_VOCAB}, and no tokenizer gptforge "
                        "can use; pass --tokenizer (byte for 257 tokens, or a gptforge tokenizer/checkpoint folder)")
    if tok.vocab_size != vocab_size:
        raise UserError(f"{origin} has {tok.vocab_size} tokens but the model has {vocab_size}; pass --tokenizer "
                        "with the tokenizer these weights were trained with")
    return tok


def tokenizer_from_spec(spec: str) -> Tokenizer:
    """gpt2, byte, or a folder: a saved gptforge tokenizer, or a checkpoint holding one in tokenizer/."""
    folder = Path(spec).expanduser()
    if (folder / TOKENIZER_DIR).is_dir() and not (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder / TOKENIZER_DIR)
    if spec in ("char", "bpe"):
        raise UserError(f"--tokenizer {spec} is learned from a corpus; pass the folder of the saved {spec} "
                        "tokenizer (e.g. a prepared data folder's tokenizer/ or a checkpoint) instead")
    return build_tokenizer(spec)
