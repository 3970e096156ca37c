"""Hugging Face's GPT-2 layout (`transformers.GPT2LMHeadModel`): config.json and weights, both ways.

How the layouts differ:
- HF's attention and MLP projections are `Conv1D` modules storing weights as (in, out); gptforge uses
  nn.Linear, (out, in). Every c_attn / c_proj / c_fc weight is transposed on the way through.
- HF names carry a `transformer.` prefix (GPT2LMHeadModel) or not (GPT2Model, OpenAI-era .bin files);
  older files also hold the causal-mask buffers `attn.bias` / `attn.masked_bias`, which are not weights.
- HF always has biases. A gptforge model with `bias=False` exports zero biases, which computes the same.
- gptforge pads the embedding (and an untied head) to `vocab_multiple` rows; the padding is zeros on import
  and dropped on export.
- Tied embeddings: HF files omit `lm_head.weight` (or repeat wte); gptforge ties when config says so.
Weights are read without pickle code execution: safetensors, or `pytorch_model.bin` via
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptforge.checkpoint import load_model, refuse_to_replace, save_tensors
from gptforge.common import UserError, write_dir_atomically
from gptforge.config import ModelConfig
from gptforge.files import contained_name, read_json, regular_file
from gptforge.lora import merge_lora
from gptforge.model import GPT
from gptforge.interop.hf_tokenizer import save_hf_tokenizer
from gptforge.options import ExportOptions
from gptforge.tokenizer import Tokenizer

CONFIG, SAFETENSORS, SAFETENSORS_INDEX, PT_BIN, PT_BIN_INDEX = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json")
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PT_BIN, PT_BIN_INDEX)  # in order of preference
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which gptforge's model uses
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # both are GELU's tanh approximation, as gptforge's MLP
CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LAYER_NORMS = ("ln_1", "ln_2")
MASK_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


# --- config ------------------------------------------------------------------------------------------
def model_config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig for an HF GPT-2 config dict; anything gptforge's model would compute differently is
    refused here, naming the field, rather than imported into silently wrong logits."""
    def refuse(what: str) -> UserError:
        return UserError(f"{where}: {what}; gptforge's GPT-2 cannot represent this model")

    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise refuse(f"model_type is '{model_type}', not 'gpt2'")
    try:
        n_embd, n_layer, n_head = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
        vocab_size, block_size = int(hf["vocab_size"]), int(hf.get("n_positions", hf.get("n_ctx")))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where} lacks a valid GPT-2 field ({e}); it needs n_embd, n_layer, n_head, "
                        "vocab_size and n_positions") from None
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU:
        raise refuse(f"activation_function is '{act}' (only the tanh GELU, gelu_new, is supported)")
    eps = float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS))
    if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
        raise refuse(f"layer_norm_epsilon is {eps} (must be 1e-05)")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise refuse(f"n_inner is {hf['n_inner']} (the MLP must be 4 * n_embd = {4 * n_embd} wide)")
    if not hf.get("scale_attn_weights", True):
        raise refuse("scale_attn_weights is false (attention must be scaled by 1/sqrt(head size))")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        raise refuse("scale_attn_by_inverse_layer_idx is true (attention scores scaled per layer)")
    if hf.get("add_cross_attention", False):
        raise refuse("add_cross_attention is true (an encoder-decoder model)")
    # reorder_and_upcast_attn only changes the precision of the attention scores under fp16/bf16, not the
    # math, so it imports (fp32 logits agree).
    return ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                       vocab_size=vocab_size, dropout=0.0, bias=True,
                       tie_embeddings=bool(hf.get("tie_word_embeddings", True))).validate()


def hf_config_from_model(cfg: ModelConfig, eot_id: int, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers' GPT2LMHeadModel, equal in function to `cfg`."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "use_cache": True, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": None,
        "dtype": dtype_name, "torch_dtype": dtype_name,  # the key transformers 5 reads, and 4's
    }


# --- weights: HF -> gptforge -------------------------------------------------------------------------
def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """gptforge state dict (fp32, vocabulary padded) from HF GPT-2 weights. `hf_state` is emptied as the
    tensors are converted, so a large model is not held twice."""
    renamed = {}
    for name in list(hf_state):
        tensor, name = hf_state.pop(name), name.removeprefix("transformer.")
        if not MASK_BUFFERS.fullmatch(name):
            renamed[name] = tensor
    hf_state = renamed
    C, V = cfg.n_embd, cfg.vocab_size

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf_state:
            raise UserError(f"{where} has no tensor '{name}'; it is incomplete or not a GPT-2 model")
        t = hf_state.pop(name)
        if tuple(t.shape) != shape:
            raise UserError(f"tensor '{name}' has shape {tuple(t.shape)}, but {where} implies {shape}; the "
                            "weights and the config do not belong together")
        return t.float()

    state = {"transformer.wte.weight": _pad_rows(take("wte.weight", (V, C)), cfg.padded_vocab_size),
             "transformer.wpe.weight": take("wpe.weight", (cfg.block_size, C))}
    for i in range(cfg.n_layer):
        for ln in LAYER_NORMS:
            for leaf in ("weight", "bias"):
                state[f"transformer.h.{i}.{ln}.{leaf}"] = take(f"h.{i}.{ln}.{leaf}", (C,))
        for module, (n_in, n_out) in zip(CONV1D, ((C, 3 * C), (C, C), (C, 4 * C), (4 * C, C))):
            name = f"h.{i}.{module}"
            state[f"transformer.{name}.weight"] = take(f"{name}.weight", (n_in, n_out)).t().contiguous()
            state[f"transformer.{name}.bias"] = take(f"{name}.bias", (n_out,))
    state["transformer.ln_f.weight"] = take("ln_f.weight", (C,))
    state["transformer.ln_f.bias"] = take("ln_f.bias", (C,))
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # transformers ties it to wte on load whatever the file holds
    else:
        state["lm_head.weight"] = _pad_rows(take("lm_head.weight", (V, C)), cfg.padded_vocab_size)
    if hf_state:
        raise UserError(f"{where} has tensors a GPT-2 language model does not: {sorted(hf_state)[:3]}; "
                        "is it another architecture or a task head (e.g. sequence classification)?")
    return state


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows below the vocabulary: padded logits are dropped by the model and never trained."""
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])]) if rows > t.shape[0] else t


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> GPT:
    """A GPT holding exactly `state`, built without spending time on a random initialisation."""
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        state = {**state, "lm_head.weight": state["transformer.wte.weight"]}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model.eval()


# --- weights: gptforge -> HF -------------------------------------------------------------------------
def hf_state_from_model(model: GPT) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel weights equal in function to `model`: Conv1D layout, no vocabulary padding, zero
    biases where the model has none, lm_head only when untied (HF ties it otherwise)."""
    cfg, sd = model.config, model.state_dict()
    C, V = cfg.n_embd, cfg.vocab_size

    def get(name: str, n_out: int) -> torch.Tensor:  # a bias, or zeros for a bias=False model
        t = sd.get(name)
        return t if t is not None else torch.zeros(n_out, dtype=sd["transformer.wte.weight"].dtype)

    out = {"transformer.wte.weight": sd["transformer.wte.weight"][:V],
           "transformer.wpe.weight": sd["transformer.wpe.weight"]}
    for i in range(cfg.n_layer):
        h = f"transformer.h.{i}"
        for ln in LAYER_NORMS:
            out[f"{h}.{ln}.weight"] = sd[f"{h}.{ln}.weight"]
            out[f"{h}.{ln}.bias"] = get(f"{h}.{ln}.bias", C)
        for module in CONV1D:
            weight = sd[f"{h}.{module}.weight"]  # (out, in)
            out[f"{h}.{module}.weight"] = weight.t()  # (in, out)
            out[f"{h}.{module}.bias"] = get(f"{h}.{module}.bias", weight.shape[0])
    out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
    out["transformer.ln_f.bias"] = get("transformer.ln_f.bias", C)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {name: t.detach().cpu().contiguous() for name, t in out.items()}


# --- folders -----------------------------------------------------------------------------------------
def is_hf_folder(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def read_hf_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, weights) of a Hugging Face model folder."""
    try:
        config = read_json(folder / CONFIG, root=folder)
    except FileNotFoundError:
        raise UserError(f"{folder} has no {CONFIG}; it is not a Hugging Face model folder") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder / CONFIG} is not a Hugging Face model config")
    return config, read_hf_weights(folder)


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    found = next((name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if found is None:
        raise UserError(f"{folder} has {CONFIG} but no {SAFETENSORS} or {PT_BIN}; download the weights too")
    files = [folder / found]
    if found.endswith(".index.json"):  # sharded: the index maps each tensor to one of a few files
        files = _index_files(folder, folder / found)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_load_safetensors(path, folder) if path.suffix == ".safetensors" else _load_torch_bin(path, folder))
    return state


def _index_files(folder: Path, index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names: plain file names inside the folder."""
    try:
        weight_map = read_json(index, root=folder)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (KeyError, TypeError, AttributeError):  # not a mapping, no weight_map, or unhashable names
        raise UserError(f"{index} is corrupt (no weight_map of tensor -> file names); download the model "
                        "again") from None
    return [contained_name(name, folder, f"{index}'s weight_map") for name in shards]


def _load_safetensors(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(regular_file(path, root=folder)), device="cpu")
    except FileNotFoundError:
        raise UserError(f"weights file {path} is missing; download the model again") from None
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is corrupt ({str(e).splitlines()[0]}); download the model again") from None


def _load_torch_bin(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin through torch's restricted unpickler: tensors and plain containers only, so a
    file carrying code (a pickled callable) is refused instead of executed."""
    try:
        state = torch.load(str(regular_file(path, root=folder)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file {path} is missing; download the model again") from None
    except pickle.UnpicklingError:
        raise UserError(f"{path} holds more than tensors (pickled objects or code) and was refused; use "
                        "a model.safetensors version of this model") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({str(e).splitlines()[0]}); download the model again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors; it is not a Hugging Face weights file")
    return state


def export_command(options: ExportOptions) -> None:
    """`gptforge export-hf`."""
    out = export_hf(Path(options.checkpoint), Path(options.out))
    print(f"exported {options.checkpoint} -> {out} (load with transformers' AutoModelForCausalLM.from_pretrained)")


def export_hf(checkpoint: Path, out: Path) -> Path:
    """Write `out` so that transformers' AutoModelForCausalLM and AutoTokenizer load it offline: config.json,
    model.safetensors, generation_config.json and the tokenizer files (see hf_tokenizer.py). Written
    atomically: a failed export leaves any earlier folder as it was."""
    out = Path(out)
    refuse_to_replace(out, (CONFIG,), "a Hugging Face model folder")
    model, tokenizer = load_language_model(Path(checkpoint), "export-hf")
    return write_hf_folder(out, model, tokenizer)


def load_language_model(checkpoint: Path, command: str) -> tuple[GPT, Tokenizer]:
    """A checkpoint as the plain language model every export format describes: LoRA adapters folded into
    the weights (no runtime outside gptforge knows them), classifiers refused (`command` names the caller)."""
    model, tokenizer, meta = load_model(Path(checkpoint))
    if meta.get("classifier"):
        raise UserError(f"{checkpoint} is a classifier; {command} writes language models only")
    if meta.get("lora"):
        merge_lora(model)  # export the weights the adapters amount to
    return model, tokenizer


def write_hf_folder(out: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    state = hf_state_from_model(model)
    hf_config = hf_config_from_model(model.config, tokenizer.eot_id, state["transformer.wte.weight"].dtype)

    def fill(d: Path) -> None:
        save_tensors(state, d / SAFETENSORS, metadata={"format": "pt"})  # transformers requires the tag
        (d / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        (d / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_hf_tokenizer(tokenizer, d, model.config.block_size)

    write_dir_atomically(out, fill)
    return out
