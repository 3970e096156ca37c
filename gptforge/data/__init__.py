"""Data: documents from a source -> token shards on disk -> batches for training.

    sources.iter_documents(cfg)      streamed documents (as pieces), each tagged train/val
    prepare.prepare(cfg, out_dir)    tokenize into shards + manifest.json
    loader.TokenLoader(dir, split, B, T, ...)   memory-mapped, rank-aware, resumable batches

Names are resolved lazily so `import gptforge.data` stays light: the loader imports torch, and the
tokenizing worker processes import this package and need none of that. The `prepare` function is
not re-exported here: the name is also the submodule's, and Python binds a package attribute to the
submodule once it is imported; use `from gptforge.data.prepare import prepare`.
"""

from importlib import import_module

_EXPORTS = {
    "Piece": "sources", "iter_documents": "sources", "read_documents": "sources",
    "shakespeare_files": "sources",
    "load_manifest": "prepare", "verify_shards": "prepare",
    "TokenLoader": "loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"gptforge.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'gptforge.data' has no attribute {name!r}")
