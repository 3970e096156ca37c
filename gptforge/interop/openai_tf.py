"""OpenAI's original GPT-2 TensorFlow checkpoints, read without TensorFlow.

A folder from openai/gpt-2's download script holds `hparams.json`, `checkpoint` (names the prefix,
`model.ckpt`) and a TF "tensor bundle" (V2 checkpoint):
    model.ckpt.index                      a LevelDB-style sorted table: tensor name -> BundleEntryProto
                                          (dtype, shape, shard_id, offset, size, crc32c); key "" holds the
                                          BundleHeaderProto (num_shards, endianness)
    model.ckpt.data-00000-of-00001        the tensors' raw bytes, back to back, little-endian
Only the handful of protobuf fields above are needed, so they are decoded by hand here: TensorFlow is a
2 GB dependency for what is a few hundred lines of file format.

`read_openai_folder` returns the weights in Hugging Face's GPT-2 layout (Conv1D weights as (in, out),
names without the `transformer.` prefix) plus an HF-style config dict, so one converter (`hf.py`) turns
both sources into gptforge weights.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from gptforge.common import UserError
from gptforge.files import read_json

HPARAMS, CHECKPOINT_FILE = "hparams.json", "checkpoint"
_TABLE_MAGIC = 0xDB4775248B80FB57  # last 8 bytes of every LevelDB/TF table file
_FOOTER_LEN = 48  # two varint BlockHandles padded to 40 bytes, then the magic
_BLOCK_TRAILER_LEN = 5  # compression type (1 byte) + masked crc32c (4 bytes)
# TF DataType enum values -> torch dtypes (torch, unlike numpy, has bfloat16)
_DTYPES = {1: torch.float32, 2: torch.float64, 3: torch.int32, 9: torch.int64, 14: torch.bfloat16,
           19: torch.float16}


# --- crc32c (Castagnoli), as TF and LevelDB use it --------------------------------------------------
def _crc_tables() -> list[np.ndarray]:
    """Slice-by-4 tables: tables[k][v] is the register after byte v followed by k zero bytes."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # reflected polynomial 0x82F63B78, one bit at a time
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0x82F63B78), t >> 1).astype(np.uint32)
    tables = [t]
    for _ in range(3):
        tables.append((t[tables[-1] & 0xFF] ^ (tables[-1] >> 8)).astype(np.uint32))
    return tables


_CRC_TABLES = _crc_tables()
_CRC_TABLE_LIST = _CRC_TABLES[0].tolist()


def _crc_raw_scalar(data: bytes, crc: int = 0) -> int:
    """The bare CRC register update over `data` (no initial or final inversion), one byte at a time."""
    table = _CRC_TABLE_LIST
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def _crc_step_words(state: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Advance many independent registers by one little-endian 4-byte word each (slice-by-4)."""
    t0, t1, t2, t3 = _CRC_TABLES
    state = state ^ words
    return (np.take(t3, state & 0xFF) ^ np.take(t2, (state >> 8) & 0xFF)
            ^ np.take(t1, (state >> 16) & 0xFF) ^ np.take(t0, state >> 24))


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C of `data`, at numpy speed for big tensors (~0.5 s per 100 MB; a byte loop in Python would
    take a minute). The register update is linear over GF(2), so the data is cut into R rows of L bytes
    whose CRCs run side by side, one numpy step per 4-byte column, and are then folded left to right
    with the precomputed effect of L zero bytes on the register."""
    buf = np.frombuffer(data, dtype=np.uint8)
    n = buf.size
    if n < 4096:
        return _crc_raw_scalar(buf.tobytes(), 0xFFFFFFFF) ^ 0xFFFFFFFF
    row_len = max(256, int(np.sqrt(n / 4))) // 4 * 4
    rows = -(-n // row_len)
    # Starting the register at 0xFFFFFFFF equals starting at 0 with the first 4 bytes inverted, and
    # leading zero bytes leave a zero register at zero, so the data is padded at the front.
    padded = np.zeros(rows * row_len, dtype=np.uint8)
    padded[-n:] = buf
    padded[-n:-n + 4] ^= np.uint8(0xFF)
    columns = np.ascontiguousarray(padded.view("<u4").reshape(rows, row_len // 4).T)  # (L/4, R)
    del padded
    state = np.zeros(rows, dtype=np.uint32)  # (R,) one register per row
    for column in columns:
        state = _crc_step_words(state, column)
    shift = _LinearMap(_crc_step_words(np.uint32(1) << np.arange(32, dtype=np.uint32), np.uint32(0)))
    shift = shift.power(row_len // 4)  # the register after L zero bytes, as a map of the register before
    acc = 0
    for r in state.tolist():
        acc = shift(acc) ^ r
    return acc ^ 0xFFFFFFFF


class _LinearMap:
    """A linear map on 32-bit registers over GF(2), given by the images of the 32 basis bits and applied
    a byte at a time through four 256-entry tables."""

    def __init__(self, images: np.ndarray):
        self.images = [int(v) for v in images]
        self.tables = []
        for k in range(4):
            table = [0]
            for image in self.images[8 * k:8 * k + 8]:
                table += [t ^ image for t in table]
            self.tables.append(table)

    def __call__(self, x: int) -> int:
        t0, t1, t2, t3 = self.tables
        return t0[x & 0xFF] ^ t1[(x >> 8) & 0xFF] ^ t2[(x >> 16) & 0xFF] ^ t3[x >> 24]

    def power(self, n: int) -> "_LinearMap":
        result, square = None, self
        while n:
            if n & 1:
                result = square if result is None else _LinearMap([result(v) for v in square.images])
            n >>= 1
            if n:
                square = _LinearMap([square(v) for v in square.images])
        return result


def unmask_crc(masked: int) -> int:
    """LevelDB/TF store crc32c values 'masked' (rotated and offset) so a CRC of CRCs stays strong."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot << 15) | (rot >> 17)) & 0xFFFFFFFF


# --- protobuf wire format, the little we need ------------------------------------------------------------
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of a serialized message; varints as int, length-delimited as bytes."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _bundle_entry(buf: bytes) -> dict:
    """BundleEntryProto: 1 dtype, 2 shape (TensorShapeProto: 2 dim {1 size}), 3 shard_id, 4 offset,
    5 size, 6 crc32c (masked), 7 slices (partitioned variables, which GPT-2 checkpoints do not use)."""
    entry = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0, "crc32c": None, "sliced": False}
    for number, value in _fields(buf):
        if number == 1:
            entry["dtype"] = value
        elif number == 2:
            entry["shape"] = [dict(_fields(dim)).get(1, 0) for n, dim in _fields(value) if n == 2]
        elif number in (3, 4, 5):
            entry[{3: "shard_id", 4: "offset", 5: "size"}[number]] = value
        elif number == 6:
            entry["crc32c"] = value
        elif number == 7:
            entry["sliced"] = True
    return entry


# --- the sorted table (model.ckpt.index) ---------------------------------------------------------------
def _read_block(data: bytes, handle: bytes, where: Path) -> bytes:
    """One table block, checked against its trailer's crc32c."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    block = data[offset:offset + size]
    trailer = data[offset + size:offset + size + _BLOCK_TRAILER_LEN]
    if len(block) != size or len(trailer) != _BLOCK_TRAILER_LEN:
        raise ValueError("block runs past the end of the file")
    if trailer[0] != 0:  # TF writes bundle indexes uncompressed; 1 would be snappy
        raise UserError(f"{where} uses compression type {trailer[0]}, which this reader does not support")
    if crc32c(block + trailer[:1]) != unmask_crc(struct.unpack("<I", trailer[1:])[0]):
        raise ValueError("block checksum mismatch")
    return block


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """Key/value pairs of a block. Keys are prefix-compressed against the previous key; a table of
    restart offsets (uint32 each, then their count) ends the block."""
    n_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * n_restarts
    out, pos, key = [], 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        out.append((key, block[pos:pos + value_len]))
        pos += value_len
    return out


def _read_table(path: Path) -> dict[str, bytes]:
    data = path.read_bytes()
    if len(data) < _FOOTER_LEN or struct.unpack("<Q", data[-8:])[0] != _TABLE_MAGIC:
        raise ValueError("not a TensorFlow checkpoint index (bad magic number)")
    footer = data[-_FOOTER_LEN:]
    _, pos = _varint(footer, 0)  # metaindex handle: offset, size (unused by bundles)
    _, pos = _varint(footer, pos)
    index_block = _read_block(data, footer[pos:], path)
    table = {}
    for _, handle in _block_entries(index_block):  # index: last key of a block -> that block's handle
        for key, value in _block_entries(_read_block(data, handle, path)):
            table[key.decode("utf-8")] = value
    return table


# --- the bundle ---------------------------------------------------------------------------------------
def read_tensor_bundle(prefix: Path, select: Optional[Callable[[str], bool]] = None) -> dict[str, torch.Tensor]:
    """The tensors of a TF V2 checkpoint `prefix` (the path without .index/.data-*), checksums verified;
    only those whose name `select` accepts, when given (optimizer slots need not be read at all)."""
    prefix = Path(prefix)
    index = prefix.with_name(prefix.name + ".index")
    try:
        table = _read_table(index)
        header = dict(_fields(table.pop("")))
    except FileNotFoundError:
        raise UserError(f"TensorFlow checkpoint index {index} not found") from None
    except (ValueError, KeyError, struct.error, IndexError) as e:
        raise UserError(f"{index} is corrupt or not a TensorFlow V2 checkpoint ({e}); download it again") from None
    if header.get(2, 0) != 0:
        raise UserError(f"{index} was written big-endian; only little-endian checkpoints are supported")
    n_shards = header.get(1) or 1
    out = {}
    for name, raw in sorted(table.items()):
        if select is None or select(name):
            out[name] = _read_tensor(prefix, name, _bundle_entry(raw), n_shards)
    return out


def _read_tensor(prefix: Path, name: str, entry: dict, n_shards: int) -> torch.Tensor:
    if entry["sliced"]:
        raise UserError(f"tensor {name} in {prefix} is partitioned into slices, which this reader does not support")
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise UserError(f"tensor {name} in {prefix} has TensorFlow dtype {entry['dtype']}, which is not supported")
    shard = prefix.with_name(f"{prefix.name}.data-{entry['shard_id']:05d}-of-{n_shards:05d}")
    buf = bytearray(entry["size"])
    try:
        with open(shard, "rb") as f:
            f.seek(entry["offset"])
            got = f.readinto(buf)
    except FileNotFoundError:
        raise UserError(f"checkpoint data file {shard} is missing") from None
    count = math.prod(entry["shape"])
    if got != entry["size"] or entry["size"] != count * dtype.itemsize:
        raise UserError(f"{shard} is truncated or does not match its index (tensor {name}); download it again")
    if entry["crc32c"] is not None and crc32c(buf) != unmask_crc(entry["crc32c"]):
        raise UserError(f"tensor {name} in {shard} fails its checksum: the file is corrupt, download it again")
    if count == 0:
        return torch.empty(entry["shape"], dtype=dtype)
    # the bundle is little-endian (checked in the header), as is every machine torch runs on
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


# --- OpenAI's GPT-2 layout ----------------------------------------------------------------------------
def is_openai_folder(folder: Path) -> bool:
    return (folder / HPARAMS).is_file() and ((folder / CHECKPOINT_FILE).is_file() or any(folder.glob("*.index")))


def checkpoint_prefix(folder: Path) -> Path:
    """The prefix the `checkpoint` file names (model_checkpoint_path: "model.ckpt"), looked up in `folder`
    first (TF may have written an absolute path from another machine), else the folder's only .index."""
    state = folder / CHECKPOINT_FILE
    if state.is_file():
        match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', state.read_text(errors="replace"), re.M)
        if match:
            named = Path(match.group(1))
            for prefix in (folder / named.name, named):
                if prefix.with_name(prefix.name + ".index").is_file():
                    return prefix
    indexes = sorted(folder.glob("*.index"))
    if len(indexes) != 1:
        raise UserError(f"{folder} has no usable `checkpoint` file and {len(indexes)} .index files; "
                        "keep exactly one model.ckpt.index there")
    return indexes[0].with_suffix("")


def read_openai_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF-style config dict, weights in HF GPT-2 layout) from an openai/gpt-2 model folder."""
    try:
        hp = read_json(folder / HPARAMS, root=folder)
        config = {"vocab_size": hp["n_vocab"], "n_positions": hp["n_ctx"], "n_embd": hp["n_embd"],
                  "n_head": hp["n_head"], "n_layer": hp["n_layer"]}
    except (FileNotFoundError, KeyError, TypeError) as e:
        raise UserError(f"{folder / HPARAMS} is corrupt or lacks {e} (needs n_vocab, n_ctx, n_embd, n_head, "
                        "n_layer)") from None
    # OpenAI's model: tied embeddings, LayerNorm epsilon 1e-5, tanh GELU: the HF GPT-2 defaults
    config.update(tie_word_embeddings=True, layer_norm_epsilon=1e-5, activation_function="gelu_new")
    weights = {}
    for name, tensor in read_tensor_bundle(checkpoint_prefix(folder), select=lambda n: _hf_name(n) is not None).items():
        if name.endswith("/w") and tensor.ndim == 3:  # conv1d weights (1, in, out) -> HF Conv1D (in, out)
            tensor = tensor[0]
        weights[_hf_name(name)] = tensor.float()
    return config, weights


def _hf_name(name: str) -> str | None:
    """model/h3/attn/c_attn/w -> h.3.attn.c_attn.weight; None for anything outside the model (e.g.
    optimizer slots or a global step, which some checkpoints carry)."""
    if name in ("model/wte", "model/wpe"):
        return name.split("/")[1] + ".weight"
    match = re.fullmatch(r"model/(?:h(\d+)/)?(ln_1|ln_2|ln_f|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/([gbw])",
                         name)
    if not match:
        return None
    layer, module, leaf = match.groups()
    prefix = f"h.{layer}." if layer is not None else ""
    return f"{prefix}{module.replace('/', '.')}.{'bias' if leaf == 'b' else 'weight'}"
