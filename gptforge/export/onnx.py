"""gptforge checkpoints as ONNX folders for onnxruntime (Python, C/C++, C#, Java, the browser via
onnxruntime-web / transformers.js, game engines).

The folder:
    model.onnx           one decoder with a key/value cache (see decoder.py for the module traced):
                           inputs   input_ids       int64   (batch, sequence)
                                    attention_mask  int64   (batch, past_sequence + sequence); 1 = token,
                                                            0 = left padding
                                    past_key_values.N.key / .value  float32 (batch, heads, past_sequence, head_size)
                           outputs  logits          float32 (batch, sequence, vocab)
                                    present.N.key / .value  float32 (batch, heads, past_sequence + sequence, head_size)
                         The prefill passes a past of length 0; each decode step passes the previous
                         presents and one token. Opset 20, torch.onnx's dynamo exporter. Weights above
                         2 GiB go to model.onnx.data beside it (ONNX's protobuf limit).
    tokenizer.json       the `tokenizers` library's format (also tokenizer_config.json and
                         special_tokens_map.json, with the chat template for chat models): what
                         transformers.js-style runtimes load
    genai_config.json    the shapes, names and special ids above, as data (onnxruntime-genai's layout)
With --int8 the weights are int8 (see quantize_int8): the blocks' matrices through onnxruntime's dynamic
quantization (int8 matmuls, activations quantized on the fly), the embeddings with a scale per row.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import torch

from gptforge.common import write_dir_atomically
from gptforge.export.decoder import CachedDecoder
from gptforge.export.shared import chat_template, check_output_dir, disk_errors, require
from gptforge.interop.hf import load_language_model
from gptforge.interop.hf_tokenizer import HF_TOKENIZER_CONFIG, save_hf_tokenizer
from gptforge.model import GPT
from gptforge.options import ExportONNXOptions
from gptforge.tokenizer import Tokenizer

MODEL, CONFIG = "model.onnx", "genai_config.json"
OPSET = 20
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
INLINE_WEIGHT_BYTES = 2 * 1024**3 - 64 * 1024**2  # a protobuf file holds at most 2 GiB, graph included


def export_onnx_command(options: ExportONNXOptions) -> None:
    """`gptforge export-onnx`."""
    out = export_onnx(Path(options.checkpoint), Path(options.out), int8=options.int8, force=options.force)
    print(f"exported {options.checkpoint} -> {out} (model.onnx {(out / 'model.onnx').stat().st_size / 1e6:.1f} MB"
          f"{', int8' if options.int8 else ''}; run it with onnxruntime)")


def export_onnx(checkpoint: Path, out: Path, int8: bool = False, force: bool = False) -> Path:
    """Write the folder `out` (see the module docstring). Atomic: a failed export leaves nothing behind,
    and an earlier export unchanged."""
    for package in ("onnx", "onnxscript") + (("onnxruntime",) if int8 else ()):
        require(package, "export-onnx")
    out = check_output_dir(Path(out), force, MODEL, "an ONNX export folder")
    model, tokenizer = load_language_model(Path(checkpoint), "export-onnx")

    def fill(d: Path) -> None:
        with quiet_libraries():
            if int8:
                export_decoder(model, d / "fp32.onnx")
                quantize_int8(d / "fp32.onnx", d / MODEL)
                for f in d.glob("fp32.onnx*"):
                    f.unlink()
            else:
                export_decoder(model, d / MODEL)
        save_hf_tokenizer(tokenizer, d, model.config.block_size)
        if tokenizer.has_chat_template:  # what apply_chat_template renders, in transformers(.js)
            config = json.loads((d / HF_TOKENIZER_CONFIG).read_text())
            (d / HF_TOKENIZER_CONFIG).write_text(json.dumps({**config, "chat_template": chat_template()},
                                                            indent=2, ensure_ascii=False) + "\n")
        (d / CONFIG).write_text(json.dumps(genai_config(model, tokenizer, int8), indent=2) + "\n")

    with disk_errors(out):
        write_dir_atomically(out, fill)
    return out


@contextlib.contextmanager
def quiet_libraries():
    """The exporter and the quantizer log advice that does not apply here (missing torchvision operators,
    pre-processing for image models): log records below ERROR are muted while they run."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
            yield
    finally:
        logging.disable(previous)


def export_decoder(model: GPT, path: Path) -> None:
    """Trace CachedDecoder with torch.onnx's dynamo exporter; batch, sequence and past length stay dynamic."""
    cfg = model.config
    B, T, P = 2, 3, 4  # example sizes; above 1 so that the exporter keeps them symbolic
    ids = torch.zeros(B, T, dtype=torch.long)
    past = [(torch.zeros(B, cfg.n_head, P, cfg.head_dim), torch.zeros(B, cfg.n_head, P, cfg.head_dim))
            for _ in range(cfg.n_layer)]
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    past_len = torch.export.Dim("past_sequence_length")
    cache_axes = {0: batch, 2: past_len}
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
              "past": [(cache_axes, cache_axes)] * cfg.n_layer}
    names = io_names(cfg.n_layer)
    program = torch.onnx.export(
        CachedDecoder(model), (ids, torch.ones(B, P + T, dtype=torch.long), past), dynamo=True,
        dynamic_shapes=shapes, input_names=names["inputs"], output_names=names["outputs"],
        opset_version=OPSET, optimize=True, verbose=False)
    mask = program.model.graph.inputs[1]  # name its length as the presents' length is named
    mask.shape = type(mask.shape)([mask.shape[0], "past_sequence_length + sequence_length"])
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(path), external_data=weight_bytes > INLINE_WEIGHT_BYTES)


def quantize_int8(source: Path, target: Path) -> None:
    """int8 weights: onnxruntime's dynamic quantization of the blocks' weight matrices (a scale per output
    channel), and the embedding tables (token, position) with a scale per row.

    The embeddings are not left to the dynamic quantizer, which gives a Gather's table one scale for all
    of it: the tied output head then computes every logit from those coarse rows (6 of 10 greedy
    continuations stayed identical on the test model, against 10 of 10 with a scale per row). The head
    computes in float32 from the int8 rows; the blocks compute in int8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    quantize_gather_tables(model)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    quantize_dynamic(model, str(target), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=weight_bytes > INLINE_WEIGHT_BYTES)


def quantize_gather_tables(model) -> None:
    """Store every float matrix a Gather reads as int8 with one scale per row. It is rebuilt by a Cast and a
    Mul of constants (not a DequantizeLinear, which onnxruntime keeps as a node and would run on the whole
    table at every step), so a runtime folds it back to float32 once, at load."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    for init in list(graph.initializer):
        table = numpy_helper.to_array(init)
        if init.name not in gathered or table.ndim != 2 or table.dtype != np.float32:
            continue
        biggest = np.abs(table).max(axis=1, keepdims=True)
        scale = np.where(biggest > 0, biggest / 127.0, 1.0).astype(np.float32)  # (rows, 1)
        q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
        name = init.name
        graph.initializer.remove(init)
        graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_scale")])
        graph.node.insert(0, helper.make_node("Mul", [f"{name}_float", f"{name}_scale"], [name], name=f"{name}_dequantize"))
        graph.node.insert(0, helper.make_node("Cast", [f"{name}_int8"], [f"{name}_float"], to=TensorProto.FLOAT,
                                              name=f"{name}_cast"))


def io_names(n_layer: int) -> dict[str, list[str]]:
    past = [name % i for i in range(n_layer) for name in (PAST_KEY, PAST_VALUE)]
    present = [name % i for i in range(n_layer) for name in (PRESENT_KEY, PRESENT_VALUE)]
    return {"inputs": ["input_ids", "attention_mask", *past], "outputs": ["logits", *present]}


def genai_config(model: GPT, tok: Tokenizer, int8: bool) -> dict:
    """The model's shapes, tensor names and special ids, in onnxruntime-genai's genai_config.json layout
    (plus a `gptforge` section on how the file was made)."""
    cfg = model.config
    stop_ids = tok.chat_stop_ids if tok.has_chat_template else [tok.eot_id]
    return {
        "model": {
            "type": "gpt2", "vocab_size": cfg.vocab_size, "context_length": cfg.block_size,
            "bos_token_id": tok.eot_id, "eos_token_id": stop_ids, "pad_token_id": tok.eot_id,
            "decoder": {
                "filename": MODEL, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_head, "head_size": cfg.head_dim, "hidden_size": cfg.n_embd,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": PAST_KEY, "past_value_names": PAST_VALUE},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {"max_length": cfg.block_size, "do_sample": False},
        "gptforge": {
            "opset": OPSET, "weights": "int8 (dynamic quantization)" if int8 else "float32",
            "tokenizer": tok.describe(), "chat_template": tok.has_chat_template,
            "shapes": {"input_ids": ["batch_size", "sequence_length"],
                       "attention_mask": ["batch_size", "past_sequence_length + sequence_length"],
                       "past": ["batch_size", cfg.n_head, "past_sequence_length", cfg.head_dim],
                       "logits": ["batch_size", "sequence_length", cfg.vocab_size],
                       "present": ["batch_size", cfg.n_head, "past_sequence_length + sequence_length", cfg.head_dim]},
            "attention_mask": "1 = token, 0 = left padding; positions count from each row's first token",
        },
    }
