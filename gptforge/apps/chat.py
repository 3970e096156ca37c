"""Multi-turn chat with a chat-fine-tuned checkpoint in the terminal (`gptforge chat CHECKPOINT`).

The tokenizer owns the chat format (`Tokenizer.encode_chat`); this module only decides what part of the
conversation the model sees each turn, and runs the read-reply loop:
- The context window holds the prompt and the reply. Room for the reply is reserved first
  (max_new_tokens, at most half the window: a longer reply makes the engine slide its window), then the
  oldest user/assistant exchanges are forgotten until the rest fits (prompts.history_start, the rule the
  server's `truncate_history` follows too). The system message always stays.
- If even the new user message alone does not fit, its end is kept (the model answers what it read
  last) and the session says how many tokens were cut.
- Replies end at the end-of-turn token (or end-of-text, or max_new_tokens).
A message is encoded on its own: encode_chat of a list is the concatenation of its messages' encodings,
which is what lets whole turns be dropped, or one cut, without re-rendering the conversation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Iterator, Optional, TextIO

import torch

from gptforge.common import UserError
from gptforge.config import SampleConfig
from gptforge.engine import Engine
from gptforge.options import ChatOptions
from gptforge.prompts import history_start, reply_room
from gptforge.terminal import input_lines
from gptforge.textgen import Where, stream_text
from gptforge.tokenizer import Tokenizer

NO_TEMPLATE = ("this checkpoint has no chat template; fine-tune it with `gptforge finetune chat` first "
               "(or use `gptforge generate` for plain text)")


@dataclasses.dataclass
class PromptFit:
    """The prompt of one turn and what had to go to fit the context window."""

    ids: list[int]
    dropped: int = 0  # messages forgotten (whole exchanges, oldest first)
    cut: int = 0  # tokens removed from the start of the new user message


def fit_prompt(tokenizer: Tokenizer, system: Optional[str], history: list[dict], user_text: str,
               budget: int) -> PromptFit:
    """Render system + history + the new user message (+ the assistant cue) in at most `budget` tokens.

    history alternates user and assistant messages, oldest first; the oldest exchanges are left out by the
    library's one rule (prompts.history_start), and then, if the new message alone is still too long,
    the start of its content."""
    head = system_ids(tokenizer, system, budget)
    pieces = [tokenizer.encode_chat([m])[0] for m in history]
    user = tokenizer.encode_chat([{"role": "user", "content": user_text}], add_generation_prompt=True)[0]
    roles = [m["role"] for m in history] + ["user"]
    start = history_start(roles, [*map(len, pieces), len(user)], budget - len(head))
    kept = [t for p in pieces[start:] for t in p]
    cut = max(0, len(head) + len(kept) + len(user) - budget)
    if cut:  # user = <|user|> content <|end|> <|assistant|>: keep the role and the content's end
        user = user[:1] + user[1 + cut:]
    return PromptFit(head + kept + user, dropped=start, cut=cut)


def system_ids(tokenizer: Tokenizer, system: Optional[str], budget: int) -> list[int]:
    """The system message's ids, checked to leave room for at least one token of a user message."""
    if system is None:
        return []
    ids = tokenizer.encode_chat([{"role": "system", "content": system}])[0]
    if len(ids) + 4 > budget:  # 4: <|user|>, a token of content, <|end|>, <|assistant|>
        raise UserError(f"the system message is {len(ids)} tokens, too long for the {budget} tokens the "
                        "context window leaves for the prompt; shorten --system or lower --sample.max_new_tokens")
    return ids


class ChatSession:
    """A conversation with a chat model: `reply(text)` streams the answer and remembers both turns."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, sample: SampleConfig, runtime: Where = None,
                 system: Optional[str] = None):
        if not tokenizer.has_chat_template:
            raise UserError(NO_TEMPLATE)
        self.engine = Engine(model, runtime)
        self.tokenizer = tokenizer
        self.sample = dataclasses.replace(sample, num_samples=1)  # one reply per turn
        self.system = system or None
        self.budget = self.engine.config.block_size - reply_room(sample.max_new_tokens, self.engine.config.block_size)
        self.history: list[dict] = []  # user/assistant messages, oldest first; the system message apart
        self.last_fit: Optional[PromptFit] = None
        system_ids(tokenizer, self.system, self.budget)  # a system message that cannot fit fails now

    def reset(self) -> None:
        self.history.clear()
        self.last_fit = None

    def messages(self) -> list[dict]:
        """The whole remembered conversation, system message first."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + list(self.history)

    def truncated_history(self) -> list[dict]:
        """What the model still sees of the conversation: forgotten exchanges are gone for good, so a
        shorter later message does not bring an old exchange back mid-conversation."""
        return self.messages()

    def prompt(self, user_text: str) -> PromptFit:
        """The next turn's prompt; forgets the exchanges that no longer fit."""
        fit = fit_prompt(self.tokenizer, self.system, self.history, user_text, self.budget)
        del self.history[:fit.dropped]
        self.last_fit = fit
        return fit

    def reply(self, user_text: str) -> Iterator[str]:
        """Text deltas of the assistant's reply. The exchange is remembered when the reply ends, also if
        the caller stops early (Ctrl-C): then the partial reply is what the assistant said."""
        fit = self.prompt(user_text)
        deltas = stream_text(self.engine, self.tokenizer, [fit.ids], self.sample,
                             stop_ids=self.tokenizer.chat_stop_ids)
        said: list[str] = []
        try:
            for _, delta in deltas:
                said.append(delta)
                yield delta
        finally:
            self.history += [{"role": "user", "content": user_text},
                             {"role": "assistant", "content": "".join(said)}]


# --- the terminal loop -----------------------------------------------------------------------------------
HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits"
BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def chat_command(options: ChatOptions) -> None:
    """`gptforge chat`: a session on the checkpoint, over this process's standard streams."""
    from gptforge.checkpoint import load_for_inference

    runtime = options.runtime()
    model, tokenizer, meta = load_for_inference(Path(options.checkpoint), runtime)
    if meta.get("classifier") or not tokenizer.has_chat_template:
        raise UserError(f"{options.checkpoint}: {NO_TEMPLATE}")
    run_chat(ChatSession(model, tokenizer, options.sample, runtime, system=options.system))


def run_chat(session: ChatSession, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
             stderr: Optional[TextIO] = None, interactive: Optional[bool] = None) -> int:
    """Read user messages line by line until /exit or end of input; stream each reply. Returns the number
    of replies. Not interactive (piped input): no prompts or colours, each reply on its own line(s), and
    notes go to stderr, so stdout holds only the replies. The streams default to the process's own."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        print(f"{DIM}chat ({session.engine.config.block_size}-token context); {HELP}{RESET}", file=stderr)
    replies = 0
    for line in input_lines(stdin, f"{BOLD}you>{RESET} " if interactive else None):
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if not text:
            continue
        if text == "/reset":
            session.reset()
            print(f"{DIM}(conversation cleared){RESET}" if interactive else "(conversation cleared)", file=stderr)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {HELP}", file=stderr)
            continue
        if interactive:
            stdout.write(f"{BOLD}model>{RESET} ")
        stream = session.reply(text)
        try:
            for delta in stream:
                stdout.write(delta)
                stdout.flush()
        except KeyboardInterrupt:
            if not interactive:
                raise
            stream.close()  # keep what was said so far; Ctrl-C at the prompt quits
            stdout.write(f"{DIM} [stopped]{RESET}")
        stdout.write("\n")
        stdout.flush()
        replies += 1
        _note_truncation(session.last_fit, stderr, interactive)
    return replies


def _note_truncation(fit: Optional[PromptFit], stderr: TextIO, interactive: bool) -> None:
    if fit is None or not (fit.dropped or fit.cut):
        return
    parts = []
    if fit.dropped:
        parts.append(f"forgot the {fit.dropped} oldest messages")
    if fit.cut:
        parts.append(f"kept only the end of your message ({fit.cut} tokens cut)")
    note = f"(context window full: {' and '.join(parts)})"
    print(f"{DIM}{note}{RESET}" if interactive else note, file=stderr)
