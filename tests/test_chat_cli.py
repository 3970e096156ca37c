"""Terminal chat: what the model sees each turn (history, truncation to the context window), replies that
end at the end-of-turn token, and `gptforge chat` driven through piped standard input."""

import io
import os
import subprocess
import sys

import pytest
import torch

from gptforge.apps.chat import ChatSession, fit_prompt, run_chat
from gptforge.checkpoint import load_model, save_checkpoint
from gptforge.cli import main
from gptforge.common import UserError
from gptforge.config import ModelConfig, SampleConfig, resolve_model_config
from gptforge.model import GPT
from gptforge.prompts import END_OF_TURN
from gptforge.textgen import generate_text
from gptforge.tokenizer import ByteTokenizer
from helpers import REPO

GREEDY = SampleConfig(max_new_tokens=12, temperature=0.0)


def chat_tokenizer() -> ByteTokenizer:
    tok = ByteTokenizer()
    tok.add_chat_tokens()
    return tok


def tiny_model(tok, cls=GPT, tie_embeddings: bool = True, **kwargs) -> GPT:
    torch.manual_seed(0)
    return cls(resolve_model_config(ModelConfig(preset="tiny", vocab_size=tok.vocab_size,
                                                tie_embeddings=tie_embeddings)), **kwargs)


class Scripted(GPT):
    """A GPT whose next token is forced after some tokens (token -> next token), so a test knows what a
    reply is: after the assistant cue it writes 'h', 'i', then ends its turn."""

    def __init__(self, config, script: dict[int, int]):
        super().__init__(config)
        self.script = script

    def forward(self, idx, targets=None, kv_cache=None, last_only=False):
        logits, loss = super().forward(idx, targets, kv_cache=kv_cache, last_only=last_only)
        for row in range(idx.size(0)):
            forced = self.script.get(int(idx[row, -1]))
            if forced is not None:
                logits[row, -1, forced] += 1e4
        return logits, loss


def scripted_session(system=None, sample=GREEDY) -> tuple[ChatSession, ByteTokenizer]:
    tok = chat_tokenizer()
    cue = tok.encode_chat([{"role": "user", "content": ""}], add_generation_prompt=True)[0][-1]
    script = {cue: ord("h"), ord("h"): ord("i"), ord("i"): tok.special_tokens[END_OF_TURN]}
    return ChatSession(tiny_model(tok, cls=Scripted, script=script), tok, sample, "cpu", system=system), tok


def ex(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def test_fit_prompt_keeps_everything_that_fits():
    tok = chat_tokenizer()
    history = ex("hello", "hi there") + ex("how are you?", "fine")
    fit = fit_prompt(tok, "Be brief.", history, "and you?", budget=1000)
    full = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "and you?"}]
    assert fit.ids == tok.encode_chat(full, add_generation_prompt=True)[0]
    assert (fit.dropped, fit.cut) == (0, 0)


def test_fit_prompt_drops_oldest_exchanges_and_keeps_the_system_message():
    tok = chat_tokenizer()
    system = {"role": "system", "content": "Be brief."}
    history = ex("first question", "first answer") + ex("second", "two") + ex("third", "three")
    user = {"role": "user", "content": "last"}
    # room for the system message, the newest exchange and the new message, not for one more exchange
    need = len(tok.encode_chat([system, *history[4:], user], add_generation_prompt=True)[0])
    fit = fit_prompt(tok, "Be brief.", history, "last", budget=need + 5)
    assert fit.ids == tok.encode_chat([system, *history[4:], user], add_generation_prompt=True)[0]
    assert (fit.dropped, fit.cut) == (4, 0)
    assert len(fit.ids) <= need + 5
    # without a system message the same rule applies, and a budget that fits exactly keeps as much
    fit = fit_prompt(tok, None, history, "last", budget=need - len(tok.encode_chat([system])[0]))
    assert fit.ids == tok.encode_chat([*history[4:], user], add_generation_prompt=True)[0] and fit.dropped == 4


def test_a_message_longer_than_the_window_keeps_its_end():
    tok = chat_tokenizer()
    system = tok.encode_chat([{"role": "system", "content": "sys"}])[0]
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    fit = fit_prompt(tok, "sys", ex("old", "reply"), text, budget=40)
    assert len(fit.ids) == 40 and fit.dropped == 2
    content = 40 - len(system) - 3  # <|user|> ... <|end|> <|assistant|>
    assert fit.cut == 100 - content
    expected = tok.encode_chat([{"role": "user", "content": text[-content:]}], add_generation_prompt=True)[0]
    assert fit.ids == system + expected


def test_reply_stops_at_end_of_turn_and_history_accumulates():
    session, tok = scripted_session(system="Be brief.")
    assert "".join(session.reply("hello")) == "hi"
    # the same prompt without the end-of-turn stop runs on past <|end|>: the stop is what ended the reply
    free = generate_text(session.engine, tok, [session.last_fit.ids], GREEDY)[0]
    assert free.startswith("hi" + END_OF_TURN) and len(free) > len("hi" + END_OF_TURN)

    assert "".join(session.reply("and again")) == "hi"
    expected = [{"role": "system", "content": "Be brief."}, *ex("hello", "hi"),
                {"role": "user", "content": "and again"}]
    assert session.last_fit.ids == tok.encode_chat(expected, add_generation_prompt=True)[0]
    assert session.messages() == [*expected, {"role": "assistant", "content": "hi"}]
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be brief."}]


def test_session_forgets_oldest_turns_when_the_window_is_full():
    # a 64-token window with 12 tokens kept for the reply leaves 52 for the prompt
    session, tok = scripted_session(system="sys")
    for i in range(6):
        assert "".join(session.reply(f"message number {i}")) == "hi"
        assert len(session.last_fit.ids) <= 52
    assert session.last_fit.dropped > 0 and session.last_fit.cut == 0
    kept = session.truncated_history()
    assert kept[0] == {"role": "system", "content": "sys"}
    assert kept[-2:] == ex("message number 5", "hi") and len(kept) < 1 + 2 * 6
    assert [m["role"] for m in kept[1:]] == ["user", "assistant"] * ((len(kept) - 1) // 2)


def test_bad_sessions_are_user_errors():
    tok = ByteTokenizer()
    with pytest.raises(UserError, match="gptforge finetune chat"):
        ChatSession(tiny_model(tok), tok, GREEDY, "cpu")
    tok = chat_tokenizer()
    with pytest.raises(UserError, match="system message is .* too long"):
        ChatSession(tiny_model(tok), tok, GREEDY, "cpu", system="x" * 60)


def test_run_chat_with_piped_input_prints_only_replies():
    session, _ = scripted_session()
    out, err = io.StringIO(), io.StringIO()
    n = run_chat(session, io.StringIO("hello\n\n/help\nsecond\n/reset\nthird\n/exit\nnot read\n"), out, err)
    assert n == 3 and out.getvalue() == "hi\nhi\nhi\n"
    assert "unknown command /help" in err.getvalue() and "(conversation cleared)" in err.getvalue()
    assert session.messages() == ex("third", "hi")  # /reset forgot the first two exchanges
    err = io.StringIO()
    run_chat(session, io.StringIO("x" * 100 + "\n"), io.StringIO(), err)
    assert "(context window full: forgot the 2 oldest messages and kept only the end of your message" in err.getvalue()


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    tok = chat_tokenizer()
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    # untied: a random tied model mostly repeats its last token, here the assistant cue, which ends a reply
    save_checkpoint(path, tiny_model(tok, tie_embeddings=False), tok)
    return path


@pytest.mark.slow
def test_chat_command_with_piped_stdin(chat_checkpoint):
    args = [sys.executable, "-m", "gptforge", "chat", str(chat_checkpoint), "--sample.temperature", "0",
            "--sample.max_new_tokens", "12", "--device", "cpu", "--system", "Be brief."]
    result = subprocess.run(args, input="hello\nhow are you\n/reset\nhello\n", capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"},
                            encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(conversation cleared)" in result.stderr

    # the same conversation in-process: the CLI keeps history across turns and /reset starts afresh
    model, tok, _ = load_model(chat_checkpoint)
    session = ChatSession(model, tok, GREEDY, "cpu", system="Be brief.")
    first, second = "".join(session.reply("hello")), "".join(session.reply("how are you"))
    session.reset()
    third = "".join(session.reply("hello"))
    assert first and second != first and third == first
    expected = f"{first}\n{second}\n{third}\n"
    assert result.stdout.replace("\r\n", "\n").replace("\r", "\n") == expected.replace("\r\n", "\n").replace("\r", "\n")


def test_chat_command_needs_a_chat_checkpoint(tmp_path, capsys):
    tok = ByteTokenizer()
    save_checkpoint(tmp_path / "plain", tiny_model(tok), tok)
    with pytest.raises(SystemExit) as exc:
        main(["chat", str(tmp_path / "plain"), "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gptforge finetune chat" in err and "Traceback" not in err
