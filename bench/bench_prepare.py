"""`prepare` throughput with the gpt2 tokenizer vs tiktoken's raw encode_ordinary_batch on the same text.

The text is a corpus file repeated to --mb megabytes. Rounds alternate the two so that load spikes on a
shared machine hit both; the median of each is reported. `prepare` includes reading, tokenizing, writing
shards, sha256 checksums and the manifest; the raw figure is tokenizing alone (both cores, same chunks).

    python bench/bench_prepare.py --corpus ../shared/data/tinyshakespeare.txt --mb 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from gptforge.config import DataConfig
from gptforge.data.prepare import prepare
from gptforge.tokenizer import gpt2_encoding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt")
    ap.add_argument("--mb", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gptforge-bench-prepare-"))
    base = args.corpus.read_text(encoding="utf-8")
    text = base * max(1, int(args.mb * 1e6 / len(base.encode())))
    src = work / "corpus.txt"
    src.write_text(text, encoding="utf-8")
    mb = src.stat().st_size / 1e6
    # the raw baseline tokenizes the same ~1 MB pieces that prepare streams
    pieces = [text[i:i + 1_000_000] for i in range(0, len(text), 1_000_000)]
    enc = gpt2_encoding()
    threads = os.cpu_count() or 1

    raw, ours = [], []
    for r in range(args.rounds):
        t = time.perf_counter()
        n_raw = sum(len(ids) for ids in enc.encode_ordinary_batch(pieces, num_threads=threads))
        raw.append(mb / (time.perf_counter() - t))
        out = work / f"shards{r}"
        t = time.perf_counter()
        manifest = prepare(DataConfig(source=str(src), tokenizer="gpt2", val_fraction=0.0), out, progress=False)
        ours.append(mb / (time.perf_counter() - t))
        shutil.rmtree(out)
    shutil.rmtree(work)
    n_ours = manifest["splits"]["train"]["tokens"]
    print(f"# {time.strftime('%Y-%m-%d')} | {mb:.1f} MB, {threads} cores | raw tokens {n_raw:,}, prepare tokens {n_ours:,} (+EOT)")
    print(f"  tiktoken encode_ordinary_batch: {statistics.median(raw):.1f} MB/s")
    print(f"  gptforge prepare:               {statistics.median(ours):.1f} MB/s")
    print(f"  ratio:                          {statistics.median(ours) / statistics.median(raw):.2f}")


if __name__ == "__main__":
    main()
