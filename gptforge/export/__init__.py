"""gptforge checkpoints in the formats other runtimes load, each checked against that runtime in the tests:

    gguf.py     export_gguf: one .gguf file for llama.cpp (architecture gpt2; F32, F16 or Q8_0 weights)
    onnx.py     export_onnx: a folder with an ONNX decoder (KV cache as inputs/outputs) for onnxruntime,
                its tokenizer.json and genai_config.json; optionally int8 weights
    decoder.py  the torch module ONNX traces: gptforge's own blocks, with the cache passed in and out
    shared.py   optional packages, output paths written atomically, the chat template (Jinja)
gguf, onnx and onnxruntime are optional (`pip install "gptforge[export]"`) and imported only when used.
"""

from gptforge.export.gguf import export_gguf
from gptforge.export.onnx import export_onnx

__all__ = ["export_gguf", "export_onnx"]
