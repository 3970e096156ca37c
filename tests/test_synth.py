"""The commands that talk to an OpenAI-compatible endpoint, against a stub server on loopback: `synth`
(counts, dedup, resume, tags read back by the text mode's reader, stopping when nothing new comes) and
one `judge` run through the CLI."""

import json
import re

import pytest

from gptforge.common import UserError
from gptforge.data.examples import read_text_corpus
from gptforge.client import ChatClient
from gptforge.apps.synth import extract_document, synthesize
from helpers import run_cli
from test_judge import Stub  # the judge tests' chat-completions stub

DELIMS = ("<LOC>", "</LOC>")


@pytest.fixture
def stub(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # loopback must not go through a proxy (CLI runs inherit this)
    s = Stub()
    yield s
    s.close()


def scripted(stub: Stub, replies: list):
    """Answer the i-th request with replies[i % len(replies)]."""
    stub.reply = lambda body: replies[(len(stub.requests) - 1) % len(replies)]


# duplicates differ only in spacing and case; one reply is blank, one wraps itself in the delimiters
REPLIES = ["A misty harbour town.", "   ", "a misty   HARBOUR town.", "<LOC>A desert fortress.</LOC>",
           "A desert fortress.", "Ice caves under the mountain.", "Ice caves under the mountain.",
           "A floating market.", "Ruins in a jungle.", "A city on the back of a turtle.", "A glass tower."]


def run(stub, out, n, **kw):
    client = ChatClient(stub.url, "gen-model", backoff=0.01, retries=kw.pop("retries", 3))
    kw.setdefault("concurrency", 1)  # one request at a time: the stub's order is the file's order
    return synthesize(out, client, kw.pop("prompt", "Describe a fantasy location."), n, delimiters=DELIMS,
                      progress=False, **kw)


def texts(path):
    return [d.text for d in read_text_corpus(path, delimiters=DELIMS).documents]


def test_counts_dedup_and_the_file_reads_back(stub, tmp_path):
    scripted(stub, REPLIES)
    out = tmp_path / "locations.txt"
    report = run(stub, out, 4, temperature=0.9)
    assert texts(out) == ["A misty harbour town.", "A desert fortress.", "Ice caves under the mountain.",
                          "A floating market."]
    assert (report.total, report.new, report.duplicates, report.empty, report.failed) == (4, 4, 3, 1, 0)
    assert len(stub.requests) == 8
    body = stub.requests[0]["body"]
    assert body["model"] == "gen-model" and body["temperature"] == 0.9
    assert body["messages"] == [{"role": "user", "content": "Describe a fantasy location."}]
    assert out.read_text().startswith("<LOC>\nA misty harbour town.\n</LOC>\n\n<LOC>\n")


def test_resume_generates_only_the_rest_without_duplicates(stub, tmp_path):
    out = tmp_path / "locations.txt"
    scripted(stub, REPLIES)
    assert run(stub, out, 3).new == 3
    first = len(stub.requests)
    stub.requests.clear()  # the stub starts its sequence again: the file's documents come back first
    report = run(stub, out, 6, concurrency=3)
    assert (report.total, report.new) == (6, 3)
    docs = texts(out)
    assert len(docs) == 6 and len({d.lower() for d in docs}) == 6
    assert docs[:3] == ["A misty harbour town.", "A desert fortress.", "Ice caves under the mountain."]
    assert report.duplicates >= 4  # the three already in the file (one of them twice), and the spaced-out one
    # a complete file makes no requests at all
    stub.requests.clear()
    assert run(stub, out, 6).new == 0 and stub.requests == [] and first > 0


def test_an_unfinished_document_from_a_crash_is_removed(stub, tmp_path):
    out = tmp_path / "locations.txt"
    scripted(stub, REPLIES)
    run(stub, out, 2)
    with open(out, "a") as f:
        f.write('<LOC tag="x">\nhalf a docu')  # a write cut short
    stub.requests.clear()
    report = run(stub, out, 3)
    assert (report.total, report.new) == (3, 1)
    assert texts(out) == ["A misty harbour town.", "A desert fortress.", "Ice caves under the mountain."]


def test_tags_fill_the_prompt_balance_and_read_back(stub, tmp_path):
    def reply(body):
        tag = re.search(r"a (\w+) place", body["messages"][0]["content"]).group(1)
        return f"A {tag} place, number {len(stub.requests)}."

    stub.reply = reply
    out = tmp_path / "tagged.txt"
    run(stub, out, 5, tags=["dark", "bright"], prompt="Describe a {tag} place.")
    corpus = read_text_corpus(out, delimiters=DELIMS)
    assert [d.tag for d in corpus.documents] == ["dark", "bright", "dark", "bright", "dark"]
    assert all(d.text.startswith(f"A {d.tag} place") for d in corpus.documents)
    assert corpus.tags == ["bright", "dark"]
    assert '<LOC tag="dark">\nA dark place, number 1.\n</LOC>' in out.read_text()
    run(stub, out, 6, tags=["dark", "bright"], prompt="Describe a {tag} place.")  # resumed: the missing one
    assert read_text_corpus(out, delimiters=DELIMS).documents[-1].tag == "bright"


def test_stops_when_nothing_new_comes_and_counts_failures(stub, tmp_path):
    out = tmp_path / "locations.txt"
    scripted(stub, ["The same place."])
    with pytest.raises(UserError, match=r"5 requests in a row gave no new document \(the last: a duplicate"):
        run(stub, out, 3, max_misses=5)
    assert texts(out) == ["The same place."] and len(stub.requests) == 6  # what was kept stays

    scripted(stub, [500, "Another place."])
    stub.requests.clear()
    report = run(stub, out, 2, retries=0)
    assert (report.new, report.failed) == (1, 1)


def test_bad_arguments_are_user_errors(stub, tmp_path):
    out = tmp_path / "x.txt"
    with pytest.raises(UserError, match="go together"):
        run(stub, out, 2, tags=["dark"])
    with pytest.raises(UserError, match="go together"):
        run(stub, out, 2, prompt="A {tag} place.")
    with pytest.raises(UserError, match="invalid tag"):
        run(stub, out, 2, tags=["two words|"], prompt="A {tag} place.")
    with pytest.raises(UserError, match="invalid tag"):  # the reader could not take it back from <LOC tag="...">
        run(stub, out, 2, tags=['say "hi"'], prompt="A {tag} place.")
    out.write_text("some notes\n")
    with pytest.raises(UserError, match="holds text but no <LOC>...</LOC> documents"):
        run(stub, out, 2)
    assert stub.requests == []


@pytest.mark.parametrize("reply,doc", [
    ("  A town.\n", "A town."), ("<LOC>\nA town.\n</LOC>", "A town."), ('<LOC tag="x">A town.</LOC> more', "A town."),
    ("Sure! <LOC>A town.</LOC>", "A town."), ("", None), ("<LOC></LOC>", None), ("A </LOC> town.", None),
])
def test_extract_document(reply, doc):
    assert extract_document(reply, DELIMS) == doc


def test_synth_and_judge_commands(stub, tmp_path):
    scripted(stub, REPLIES)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe a fantasy location.")
    out = tmp_path / "corpus.txt"
    result = run_cli("synth", "--endpoint", stub.url, "--model", "gen", "--prompt_file", str(prompt), "--n", "3",
                     "--out", str(out), "--delimiters", "<LOC>,</LOC>", "--concurrency", "1", "--progress", "false",
                     env={"GPTFORGE_API_KEY": "sk-env"}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"{out}: 3 documents (3 new; skipped 2 duplicates, 1 empty, 0 failed requests)" in result.stdout
    assert "--finetune.delimiters '<LOC>,</LOC>'" in result.stdout
    assert len(texts(out)) == 3 and stub.requests[0]["headers"]["Authorization"] == "Bearer sk-env"

    stub.requests.clear()
    stub.reply = lambda body: "80" if "`good`" in body["messages"][0]["content"] else "40"
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"instruction": "Say hi.", "output": "hi", "response": r}) + "\n"
                                 for r in ("good", "bad", "good")))
    result = run_cli("judge", str(responses), "--endpoint", stub.url, "--model", "judge", "--api_key", "sk-arg",
                     "--out", str(tmp_path / "judged.jsonl"), "--json", str(tmp_path / "report.json"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "judge judge: mean score 66.7 over 3 of 3 items (0 failed)" in result.stdout
    assert stub.requests[0]["headers"]["Authorization"] == "Bearer sk-arg"
    assert [json.loads(line)["score"] for line in (tmp_path / "judged.jsonl").read_text().splitlines()] == [80, 40, 80]
    assert json.loads((tmp_path / "report.json").read_text())["mean"] == pytest.approx(200 / 3)


def test_a_redirect_ends_the_run_and_the_key_stays_with_the_endpoint(stub, tmp_path):
    elsewhere = Stub()  # another port: another origin, answering anything with "99"
    try:
        stub.reply = lambda body: (302, elsewhere.url + "/chat/completions")
        client = ChatClient(stub.url, "gen-model", api_key="sk-secret", backoff=0.01)
        with pytest.raises(UserError, match=r"redirected \(HTTP 302\) to http://127\.0\.0\.1"):
            synthesize(tmp_path / "out.txt", client, "Describe a place.", 3, delimiters=DELIMS, progress=False)
        assert elsewhere.requests == []
        assert not (tmp_path / "out.txt").exists() or "99" not in (tmp_path / "out.txt").read_text()
    finally:
        elsewhere.close()
