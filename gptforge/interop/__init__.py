"""GPT-2 weights in and out: OpenAI's TensorFlow checkpoints and Hugging Face folders -> gptforge
checkpoints (`import_gpt2`), and gptforge checkpoints -> folders transformers loads (`export_hf`).

    importer.py       import_gpt2: find the source (folder or Hub id), pick the tokenizer, save a checkpoint
    hf.py             HF GPT-2 config/weights <-> gptforge (Conv1D transposes, padding, biases), export_hf
    openai_tf.py      a TF-free reader of TensorFlow V2 checkpoints (tensor bundles) with OpenAI's names
    hf_tokenizer.py   gptforge tokenizers as tokenizer.json for transformers, and back
transformers is never imported here; huggingface_hub only when downloading.
"""

from gptforge.interop.hf import export_hf, hf_state_from_model, model_config_from_hf, state_from_hf
from gptforge.interop.hf_tokenizer import hf_tokenizer, tokenizer_from_hf_folder
from gptforge.interop.importer import import_gpt2
from gptforge.interop.openai_tf import read_openai_folder, read_tensor_bundle

__all__ = ["export_hf", "hf_state_from_model", "hf_tokenizer", "import_gpt2", "model_config_from_hf",
           "read_openai_folder", "read_tensor_bundle", "state_from_hf", "tokenizer_from_hf_folder"]
