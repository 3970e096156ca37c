"""Fine-tuning data: readers on slices of the real files (tests/fixtures/), formats and masks, batch sources
that cover each epoch exactly once and resume bitwise, and one-line errors for bad input."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from gptforge.common import UserError
from gptforge.data.batches import (ClassifyBatches, PackedTextBatches, SFTBatches, encode_conversations,
                                   encode_instructions, encode_labeled, fit_sequence, pack_documents)
from gptforge.data.examples import (Document, LabeledText, document_block, parse_delimiters, read_conversations,
                                    read_instructions, read_labeled, read_text_corpus, split_examples)
from gptforge.prompts import alpaca_prompt
from gptforge.tokenizer import ByteTokenizer, GPT2Tokenizer

# Slices of real data (tests/fixtures/README.md says where each comes from)
FIXTURES = Path(__file__).parent / "fixtures"
SMS = FIXTURES / "sms_spam_first400.tsv"
ALPACA = FIXTURES / "alpaca_first60.json"
OASST = FIXTURES / "oasst_en_first8_trees.jsonl"


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def chat_tokenizer():
    tok = ByteTokenizer()
    tok.add_chat_tokens()
    return tok


def learned(x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    """Per row, the target tokens that carry loss."""
    return [row[row != -100].tolist() for row in y]


# --- readers on real data ----------------------------------------------------------------------------
def test_sms_spam_reads_crlf_tsv_and_splits_stratified():
    data = read_labeled(SMS)
    assert len(data.examples) == 400
    assert data.class_names == ["ham", "spam"]
    assert Counter(e.label for e in data.examples) == {"ham": 342, "spam": 58}
    assert data.examples[0].text == ("Go until jurong point, crazy.. Available only in bugis n great world "
                                     "la e buffet... Cine there got amore wat...")
    assert not any("\r" in e.text or "\r" in e.label for e in data.examples)

    labels = [e.label for e in data.examples]
    splits = split_examples(data.examples, val_fraction=0.1, test_fraction=0.2, seed=0, labels=labels)
    sizes = {k: (len(v), sum(e.label == "spam" for e in v)) for k, v in splits.items()}
    # per class round(n * fraction): val 34 ham + 6 spam, test 68 + 12 (342 ham, 58 spam)
    assert sizes == {"train": (280, 40), "val": (40, 6), "test": (80, 12)}
    assert sorted(map(id, sum(splits.values(), []))) == sorted(map(id, data.examples))  # a partition
    again = split_examples(data.examples, 0.1, 0.2, seed=0, labels=labels)
    assert again == splits and split_examples(data.examples, 0.1, 0.2, seed=1, labels=labels) != splits
    # each split keeps file order
    order = {id(e): i for i, e in enumerate(data.examples)}
    assert all([order[id(e)] for e in v] == sorted(order[id(e)] for e in v) for v in splits.values())


def test_alpaca_reads_and_splits():
    examples = read_instructions(ALPACA)
    assert len(examples) == 60
    assert examples[2] == {"instruction": "Convert 45 kilometers to meters.", "input": "",
                           "output": "45 kilometers is 45000 meters."}
    splits = split_examples(examples, val_fraction=0.05, test_fraction=0.1, seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 51, "val": 3, "test": 6}


def _assert_well_formed(conversations):
    for conv in conversations:
        roles = [m["role"] for m in conv]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating


def test_oasst_trees_give_all_paths_or_top_ranked():
    path = OASST
    every = read_conversations(path, oasst_paths="all")
    top = read_conversations(path, oasst_paths="top")
    assert len(every) == 37 and sum(map(len, every)) == 116  # 8 trees, 79 messages
    assert len(top) == 8 and sum(map(len, top)) == 20
    _assert_well_formed(every)
    _assert_well_formed(top)
    assert len({json.dumps(c) for c in every}) == len(every)  # no duplicates
    # no conversation is a prefix of another, and every assistant message of the file is learned somewhere
    learned_texts = {m["content"] for c in every for m in c if m["role"] == "assistant"}
    trees = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    def assistant_texts(node):
        yield from [node["text"]] if node["role"] == "assistant" else []
        for reply in node["replies"]:
            yield from assistant_texts(reply)

    assert learned_texts == {t for tree in trees for t in assistant_texts(tree["prompt"])}
    # the top path follows the best-ranked reply: the first tree's rank-0 answer
    first = trees[0]["prompt"]
    best = min(first["replies"], key=lambda r: r["rank"])
    assert top[0][:2] == [{"role": "user", "content": first["text"]},
                          {"role": "assistant", "content": best["text"]}]


def test_oasst_rank_ties_missing_ranks_and_deleted(tmp_path):
    def msg(role, text, replies=(), **kw):
        return {"role": role, "text": text, "replies": list(replies), **kw}

    tree = {"message_tree_id": "t", "prompt": msg("prompter", "q", [
        msg("assistant", "unranked"),
        msg("assistant", "second", rank=1, replies=[msg("prompter", "follow-up")]),
        msg("assistant", "deleted", rank=0, deleted=True),
        msg("assistant", "best", rank=0.5),
    ])}
    (tmp_path / "t.jsonl").write_text(json.dumps(tree) + "\n")
    top = read_conversations(tmp_path / "t.jsonl", oasst_paths="top")
    assert [m["content"] for m in top[0]] == ["q", "best"]
    every = read_conversations(tmp_path / "t.jsonl", oasst_paths="all")
    assert [[m["content"] for m in c] for c in every] == [["q", "unranked"], ["q", "second"], ["q", "best"]]


# --- formats and masks ---------------------------------------------------------------------------------
def test_instruction_template_and_masked_targets(gpt2):
    ex = {"instruction": "Edit the following sentence for grammar.", "input": "He go to the park every day.",
          "output": "He goes to the park every day."}
    prompt_text = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\nEdit the following sentence for grammar."
                   "\n\n### Input:\nHe go to the park every day.\n\n### Response:\n")
    assert alpaca_prompt(ex["instruction"], ex["input"]) == prompt_text
    assert "### Input" not in alpaca_prompt("Say hi.")
    ids, mask = gpt2.encode_instruction(ex)
    prompt, prompt_mask = gpt2.encode_instruction({"instruction": ex["instruction"], "input": ex["input"]},
                                                  with_response=False)
    assert ids[: len(prompt)] == prompt == gpt2.encode(prompt_text) and set(prompt_mask) == {0}
    assert gpt2.decode(ids) == prompt_text + ex["output"] + "<|endoftext|>"

    other = {"instruction": "Convert 45 kilometers to meters.", "output": "45 kilometers is 45000 meters."}
    enc = encode_instructions([ex, other], gpt2, block_size=128)
    assert (enc.truncated, enc.dropped) == (0, 0)
    x, y = SFTBatches(enc.sequences, batch_size=2, pad_id=gpt2.eot_id, seed=3).iter_epoch().__next__()
    assert x.shape == y.shape == (2, max(len(s[0]) for s in enc.sequences) - 1)
    assert [gpt2.decode(t) for t in learned(x, y)] == [ex["output"] + "<|endoftext|>",
                                                       other["output"] + "<|endoftext|>"]
    assert (x[1, len(enc.sequences[1][0]) - 1:] == gpt2.eot_id).all()  # the shorter row is padded with eot


def test_chat_batches_learn_exactly_the_assistant_turns():
    tok = chat_tokenizer()
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}]
    enc = encode_conversations([conv, conv[1:3]], tok, block_size=256)
    x, y = next(SFTBatches(enc.sequences, batch_size=2, pad_id=tok.eot_id).iter_epoch())
    assert [tok.decode(t) for t in learned(x, y)] == ["Hello.<|end|>Blue.<|end|>", "Hello.<|end|>"]
    assert torch.equal(x[0], torch.tensor(tok.encode_chat(conv)[0][:-1]))


def test_long_conversations_keep_whole_turns_or_the_start(tmp_path):
    tok = chat_tokenizer()
    turns = [{"role": "user", "content": "q" * 10}, {"role": "assistant", "content": "a" * 10},
             {"role": "user", "content": "r" * 10}, {"role": "assistant", "content": "b" * 10}]
    turn_len = 12  # <|role|> + 10 bytes + <|end|>
    whole = encode_conversations([turns], tok, block_size=3 * turn_len + 5)
    assert whole.truncated == 1 and whole.dropped == 0
    assert tok.decode(whole.sequences[0][0]).endswith("a" * 10 + "<|end|>")  # cut after turn 2, not mid-turn
    start = encode_conversations([turns], tok, block_size=turn_len + 4)  # not even one whole exchange fits
    ids, mask = start.sequences[0]
    assert tok.decode(ids) == "<|user|>" + "q" * 10 + "<|end|><|assistant|>" + "aaaa"
    assert encode_conversations([turns], tok, block_size=turn_len).dropped == 1  # no assistant token fits
    assert fit_sequence([1, 2, 3, 4], [0, 1, 0, 0], limit=10) == ([1, 2], [0, 1])  # unlearned tail goes


def test_long_instruction_keeps_the_start_and_drops_if_no_response_fits():
    tok = ByteTokenizer()
    ex = {"instruction": "Repeat.", "output": "x" * 50}
    n_prompt = len(tok.encode_instruction(ex, with_response=False)[0])
    cut = encode_instructions([ex], tok, block_size=n_prompt + 9)
    assert cut.truncated == 1 and tok.decode(cut.sequences[0][0]).endswith("### Response:\n" + "x" * 10)
    assert encode_instructions([ex], tok, block_size=n_prompt - 1).dropped == 1


# --- text mode: documents, delimiters, tags, packing ------------------------------------------------------
def test_paragraph_and_file_rules(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"First doc\r\nline two.\r\n\r\n  \r\n\r\nSecond doc.\r\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Third doc.\n")
    corpus = read_text_corpus(tmp_path)
    assert [d.text for d in corpus.documents] == ["First doc\nline two.", "Second doc.", "Third doc."]
    assert corpus.tags == []
    by_file = read_text_corpus(tmp_path, documents="file").documents
    assert [d.text for d in by_file] == ["First doc\nline two.\n\n  \n\nSecond doc.", "Third doc."]


def test_delimited_documents_with_tags(tmp_path):
    path = tmp_path / "locs.txt"
    path.write_bytes(b'Here are places:\r\n<LOC tag="dark">A cold crypt.</LOC> junk\r\n'
                     b"<LOC>\r\n A sunny meadow.\r\n</LOC>\r\n<LOC tag=\"bright\">A shining hall.</LOC>\r\n")
    corpus = read_text_corpus(path, delimiters=("<LOC>", "</LOC>"))
    assert corpus.documents == [Document("A cold crypt.", "dark"), Document("A sunny meadow."),
                                Document("A shining hall.", "bright")]
    assert corpus.tags == ["bright", "dark"]

    tok = ByteTokenizer()
    with pytest.raises(UserError, match="unknown tag 'dark'"):
        pack_documents(corpus.documents, tok)
    bright, dark = tok.add_tag_tokens(corpus.tags)
    assert tok.tags == ["bright", "dark"] and tok.decode([dark]) == "<|tag:dark|>"
    stream = pack_documents(corpus.documents, tok)
    eot = tok.eot_id
    expected = ([eot, dark] + tok.encode("A cold crypt.") + [eot] + tok.encode("A sunny meadow.") + [eot, bright]
                + tok.encode("A shining hall.") + [eot])
    assert stream.tolist() == expected
    assert tok.encode_tagged("A", "dark") == [dark, ord("A")]


def test_document_blocks_read_back_with_awkward_tags(tmp_path):
    delims = parse_delimiters(" <LOC> , </LOC> ")
    assert delims == ("<LOC>", "</LOC>")
    docs = [Document("A cold crypt.", "dark & 'stormy' = night/2"), Document("Plain <b>text</b>.\n\nTwo parts."),
            Document("A café.", "été, naïve")]
    path = tmp_path / "locs.txt"
    path.write_text("".join(document_block(d.text, d.tag, delims) for d in docs), encoding="utf-8")
    assert read_text_corpus(path, delimiters=delims).documents == docs
    for bad in ('say "hi"', "a>b", "a<b", "two\nlines", "a|b", " padded"):  # refused by the writer ...
        with pytest.raises(UserError, match="invalid tag"):
            document_block("A place.", bad, delims)
    with pytest.raises(UserError, match="must look like <NAME>"):
        document_block("A place.", "dark", ("###", "@@@"))
    with pytest.raises(UserError, match="hold no <LOC> or </LOC>"):
        document_block("A <LOC> inside.", None, delims)
    path.write_text('<LOC tag="a>b">x</LOC>\n')  # ... and by the reader, naming the line
    assert "locs.txt:1: invalid tag 'a>b'" in _error(read_text_corpus, path, delimiters=delims)
    for opening in ('<LOC tag="say "hi"">', "<LOC tag=dark>", '<LOC tag="two\nlines">'):
        path.write_text(f"intro\n{opening}x</LOC>\n")
        assert "locs.txt:2: malformed opening" in _error(read_text_corpus, path, delimiters=delims)
    with pytest.raises(UserError, match="--finetune.delimiters takes 'OPEN,CLOSE'"):
        parse_delimiters("<LOC>", "--finetune.delimiters")


def test_jsonl_documents_with_tags(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "A dark wood.", "tag": "dark"}\n\n{"text": " Plain. "}\n')
    corpus = read_text_corpus(path)
    assert corpus.documents == [Document("A dark wood.", "dark"), Document("Plain.")] and corpus.tags == ["dark"]


def test_packing_covers_every_token_once_per_epoch():
    tok = ByteTokenizer()
    rng = random.Random(0)
    docs = [Document("".join(rng.choice("abcdefghij ") for _ in range(rng.randint(5, 40)))) for _ in range(40)]
    stream = pack_documents(docs, tok)
    T = 16
    source = PackedTextBatches(stream, block_size=T, batch_size=1, pad_id=tok.eot_id, seed=5)
    assert source.n_items == -(-(len(stream) - 1) // T) and source.steps_per_epoch == source.n_items
    targets = []
    for _ in range(source.steps_per_epoch):
        x, y = source.next_batch()
        assert x.shape == y.shape == (1, T)
        keep = y[0] != -100
        assert torch.equal(x[0, 1:][keep[1:]], y[0, :-1][keep[1:]])  # y is x shifted by one
        targets.append(y[0, keep].tolist())
    assert source.epoch == 1.0
    # reassembling the windows in stream order gives every token after the first exactly once
    windows = {tuple(source.stream[i * T + 1:i * T + T + 1].tolist()): i for i in range(source.n_items)}
    order = [windows[tuple(t)] for t in targets]
    assert sorted(order) == list(range(source.n_items)) and order != sorted(order)  # all, once, shuffled
    assert sum((targets[order.index(i)] for i in range(source.n_items)), []) == stream[1:].tolist()


def test_batches_straddle_epochs_without_gaps():
    tok = ByteTokenizer()
    stream = pack_documents([Document(" ".join(str(i) for i in range(40)))], tok)  # no two windows alike
    source = PackedTextBatches(stream, block_size=8, batch_size=3, pad_id=tok.eot_id)
    n = source.n_items
    rows = [tuple(r.tolist()) for _ in range(2 * n // 3 + 1) for r in source.next_batch()[0]]
    assert len(set(rows[:n])) == n and len(set(rows[n:2 * n])) == n  # each epoch: every window once
    assert rows[:n] != rows[n:2 * n]  # a fresh order each epoch


# --- classification -------------------------------------------------------------------------------------------
def test_classification_padding_truncation_and_json_formats(tmp_path):
    tok = ByteTokenizer()
    examples = [LabeledText("abcdefgh", "b"), LabeledText("xy", "a")]
    start = encode_labeled(examples, tok, ["a", "b"], max_length=4)
    assert start.truncated == 1 and start.sequences == [(list(b"abcd"), 1), (list(b"xy"), 0)]
    assert encode_labeled(examples, tok, ["a", "b"], max_length=4, keep="end").sequences[0] == (list(b"efgh"), 1)
    x, y = next(ClassifyBatches(start.sequences, num_classes=2, batch_size=2).iter_epoch())
    assert x.tolist() == [list(b"abcd"), [ord("x"), ord("y"), -1, -1]] and y.tolist() == [1, 0]

    (tmp_path / "d.csv").write_text('id,text,label\n1,"Hello, world\nsecond line",pos\n2,Bye,neg\n')
    data = read_labeled(tmp_path / "d.csv")
    assert data.examples == [LabeledText("Hello, world\nsecond line", "pos"), LabeledText("Bye", "neg")]
    assert data.class_names == ["neg", "pos"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": f"t{i}", "y": i % 11}) + "\n" for i in range(22)))
    data = read_labeled(tmp_path / "d.jsonl", text_field="body", label_field="y")
    assert data.class_names == [str(i) for i in range(11)]  # integer labels sort numerically
    (tmp_path / "d.tsv").write_text("x\tpos\tHi there\ny\tneg\tBye\n")
    assert read_labeled(tmp_path / "d.tsv", text_field="2", label_field="1").examples[1] == LabeledText("Bye", "neg")


@pytest.mark.parametrize("balance", ["downsample", "oversample"])
def test_balanced_sampling_gives_equal_class_counts(balance):
    data = read_labeled(SMS)
    enc = encode_labeled(data.examples, ByteTokenizer(), data.class_names, max_length=16)
    per_class = {"downsample": 58, "oversample": 342}[balance]
    source = ClassifyBatches(enc.sequences, num_classes=2, batch_size=per_class, balance=balance, seed=1)
    assert source.epoch_size == 2 * per_class and source.steps_per_epoch == 2
    labels = torch.cat([source.next_batch()[1] for _ in range(2)])
    assert Counter(labels.tolist()) == {0: per_class, 1: per_class} and source.epoch == 1.0
    if balance == "oversample":  # every ham once per epoch, every spam at least 5 times
        assert source.class_counts == [342, 58]
    evaluated = torch.cat([y for _, y in source.iter_epoch(batch_size=1000)])
    assert Counter(evaluated.tolist()) == {0: 342, 1: 58}  # evaluation sees the split as it is


# --- exact resume -------------------------------------------------------------------------------------------------
def _sources():
    tok = chat_tokenizer()
    docs = [Document(f"doc {i}: " + "la " * (i % 5)) for i in range(30)]
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 9 + 1)}]
             for i in range(13)]
    labeled = [LabeledText("t" * (i % 6 + 1), "ab"[i % 3 == 0]) for i in range(17)]
    return {
        "packed": lambda: PackedTextBatches(pack_documents(docs, tok), 8, 3, tok.eot_id, seed=7),
        "sft": lambda: SFTBatches(encode_conversations(convs, tok, 32).sequences, 3, tok.eot_id, seed=7),
        "classify": lambda: ClassifyBatches(encode_labeled(labeled, tok, ["a", "b"], 4).sequences, 2, 3,
                                            seed=7),
        "classify-down": lambda: ClassifyBatches(encode_labeled(labeled, tok, ["a", "b"], 4).sequences, 2, 3,
                                                 balance="downsample", seed=7),
    }


@pytest.mark.parametrize("name", ["packed", "sft", "classify", "classify-down"])
def test_resume_is_bitwise_mid_epoch_and_across_epochs(name):
    make = _sources()[name]
    reference = make()
    total = 3 * reference.steps_per_epoch + 2
    expected = [reference.next_batch() for _ in range(total)]
    for stop in (1, reference.steps_per_epoch - 1, reference.steps_per_epoch + 1, 2 * reference.steps_per_epoch):
        first = make()
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch
        for x_y in expected[stop:]:
            got = resumed.next_batch()
            assert all(torch.equal(a, b) for a, b in zip(got, x_y)), f"{name}: differs after resume at {stop}"


def test_resume_refuses_changed_data_or_options():
    sources = _sources()
    state = sources["classify"]().state_dict()
    with pytest.raises(UserError, match="same options"):
        sources["classify-down"]().load_state_dict(state)
    with pytest.raises(UserError, match="same mode"):
        sources["sft"]().load_state_dict(state)
    other = ClassifyBatches([([1, 2], 0), ([3], 1)], num_classes=2, batch_size=1)
    with pytest.raises(UserError, match="data differs"):
        other.load_state_dict(state)
    with pytest.raises(UserError, match="corrupt"):
        other.load_state_dict({"rows": 3})


def test_ranks_split_the_global_batch_and_evaluation():
    tok = chat_tokenizer()
    convs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": str(i)}] for i in range(13)]
    sequences = encode_conversations(convs, tok, 16).sequences
    single = SFTBatches(sequences, 6, tok.eot_id, seed=2)  # batch 2B in one process sees what ...
    ranks = [SFTBatches(sequences, 3, tok.eot_id, seed=2, rank=r, world_size=2) for r in range(2)]  # B x 2
    for _ in range(5):
        x, y = single.next_batch()
        parts = [source.next_batch() for source in ranks]
        assert learned(x, y) == learned(*parts[0]) + learned(*parts[1])
    assert ranks[0].rows == single.rows and ranks[0].epoch == single.epoch
    n = sum(len(y) for y, _ in ranks[0].iter_epoch()) + sum(len(y) for y, _ in ranks[1].iter_epoch())
    assert n == single.n_items and len(list(single.iter_epoch(max_batches=2))) == 2


# --- errors: one line each ------------------------------------------------------------------------------------
def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_clear_errors(tmp_path):
    assert "not found" in _error(read_labeled, tmp_path / "missing.tsv")
    assert "not found" in _error(read_text_corpus, tmp_path / "missing")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "holds no conversations" in _error(read_conversations, tmp_path / "empty.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "holds no documents" in _error(read_text_corpus, tmp_path / "empty.txt")
    (tmp_path / "h.csv").write_text("text,category\nhi,a\n")
    assert "no column 'label'" in _error(read_labeled, tmp_path / "h.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": "a"}\n{"text": "oops",\n')
    assert "bad.jsonl line 2: not valid JSON" in _error(read_labeled, tmp_path / "bad.jsonl")
    (tmp_path / "locs.txt").write_text("intro\n<LOC>fine</LOC>\n<LOC>  \n</LOC>\n")
    assert "locs.txt:3: the document is empty" in _error(read_text_corpus, tmp_path / "locs.txt",
                                                         delimiters=("<LOC>", "</LOC>"))
    (tmp_path / "open.txt").write_text("<LOC>one\n<LOC>two</LOC>")
    assert "not closed" in _error(read_text_corpus, tmp_path / "open.txt", delimiters=("<LOC>", "</LOC>"))
    assert "encodes to no tokens" in _error(pack_documents, [Document("")], ByteTokenizer())
    assert "encodes to no tokens" in _error(encode_labeled, [LabeledText("", "a")], ByteTokenizer(), ["a"], 8)
    (tmp_path / "inst.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "d"}\n')
    assert "inst.jsonl:2: example has no 'output'" in _error(read_instructions, tmp_path / "inst.jsonl")
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert "chat.jsonl:1: the conversation has no assistant" in _error(read_conversations, tmp_path / "chat.jsonl")
    (tmp_path / "tabs.tsv").write_text("ham\tok\nspam\ttoo\tmany\n")
    assert "tabs.tsv:2: 3 tab-separated fields" in _error(read_labeled, tmp_path / "tabs.tsv")
    assert "too few" in _error(split_examples, [1, 2], val_fraction=0.3, test_fraction=0.3)
    assert "balance" in _error(ClassifyBatches, [([1], 0)], 1, 1, balance="up")
    assert "no examples" in _error(SFTBatches, [], 1, 0)
