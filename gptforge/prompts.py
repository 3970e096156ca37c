"""Prompt and chat formats, as text and special-token names. The tokenizer turns them into ids and loss
masks (Tokenizer.encode_chat); everything that builds a prompt (fine-tuning, chat CLI, server) goes
through it, so training and inference can never disagree about a format. Also here: the one rule for
which turns of a conversation still fit a context window (history_start), shared by the chat CLI and the
server."""

from __future__ import annotations

from typing import Mapping, Sequence

from gptforge.common import UserError

# Each turn is <|role|> content <|end|>. Roles are special tokens, so a user typing "<|user|>" stays text.
CHAT_ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in CHAT_ROLES}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)


def check_messages(messages: Sequence[Mapping]) -> list[tuple[str, str]]:
    """Validate chat messages ({'role', 'content'}) and return (role, content) pairs."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise UserError("a conversation must be a non-empty list of {'role', 'content'} messages")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UserError(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise UserError(f"message {i} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"message {i} content must be a string, got {type(content).__name__}")
        pairs.append((role, content))
    return pairs


def reply_room(max_new_tokens: int, context_length: int) -> int:
    """Tokens a chat keeps free for the reply when it decides what history fits: all of max_new_tokens,
    but never more than half the window, so a long max_new_tokens still leaves the model some
    conversation to read."""
    return max(1, min(max_new_tokens, context_length // 2))


def history_start(roles: Sequence[str], lengths: Sequence[int], budget: int) -> int:
    """Where the conversation a model reads starts when it must fit in `budget` tokens: the index of the
    first message kept. Messages before it are left out, except system messages, which always stay; the
    newest message always stays. lengths[i] is message i's tokens as the tokenizer renders it alone
    (encode_chat of a list is the concatenation of its messages', so lengths add up; the newest one's
    includes the assistant cue after it).

    Whole exchanges go, oldest first: leaving a message out leaves out everything up to the next user
    message, so the model never reads a reply without its question. What is left may still not fit (a
    newest message longer than the budget): the caller then cuts it or refuses. The chat CLI and the
    server's `truncate_history` both follow this one rule."""
    total, last = sum(lengths), len(roles) - 1
    start = 0
    while total > budget and start < last:
        end = start + 1  # one exchange: the oldest message and what follows it, up to the next user message
        while end < last and roles[end] != "user":
            end += 1
        total -= sum(n for role, n in zip(roles[start:end], lengths[start:end]) if role != "system")
        start = end
    return start


# --- instruction format: the Alpaca template (as in LLMs-from-scratch ch07) -------------------------
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The prompt a response follows: preamble, instruction, the input section only when there is input,
    and the response header (ending in a newline, so the response starts a fresh line)."""
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input:
        text += f"\n\n### Input:\n{input}"
    return text + "\n\n### Response:\n"


def check_instruction(example: Mapping, need_output: bool = True) -> tuple[str, str, str]:
    """Validate an Alpaca example ({'instruction', optional 'input', 'output'}) and return
    (instruction, input, output); output is "" when not needed and absent."""
    if not isinstance(example, Mapping):
        raise UserError(f"an instruction example must be an object, got {type(example).__name__}")
    instruction, input_, output = example.get("instruction"), example.get("input"), example.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise UserError("example has no 'instruction' text; each example needs instruction and output "
                        "(input is optional)")
    if input_ is not None and not isinstance(input_, str):
        raise UserError(f"example 'input' must be a string, got {type(input_).__name__}")
    if output is None and not need_output:
        output = ""
    elif not isinstance(output, str) or not output.strip():
        missing = "has no 'output'" if output is None else "has an empty or non-string 'output'"
        raise UserError(f"example {missing}; each example needs instruction and output (input is optional)")
    return instruction, input_ or "", output


# --- control tags: a document's theme/tone/type as a prefix special token ---------------------------
TAG_PREFIX, TAG_SUFFIX = "<|tag:", "|>"
MAX_TAG_CHARS = 64


def tag_token(tag: str) -> str:
    """'dark' -> '<|tag:dark|>'. Tags are short names; characters that would blur the token's edges are
    refused so that the token name maps back to exactly one tag."""
    if not isinstance(tag, str) or not tag or tag != tag.strip() or len(tag) > MAX_TAG_CHARS \
            or any(c in tag for c in "|<>\n\r\t"):
        raise UserError(f"invalid tag {tag!r}: use a short name (1-{MAX_TAG_CHARS} characters) without "
                        "surrounding spaces, '|', '<', '>' or line breaks")
    return f"{TAG_PREFIX}{tag}{TAG_SUFFIX}"


def tag_of_token(name: str) -> str | None:
    """'<|tag:dark|>' -> 'dark'; None for any other token name."""
    if name.startswith(TAG_PREFIX) and name.endswith(TAG_SUFFIX) and len(name) > len(TAG_PREFIX + TAG_SUFFIX):
        return name[len(TAG_PREFIX):-len(TAG_SUFFIX)]
    return None
