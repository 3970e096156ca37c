"""The one rule for leaving the oldest turns of a conversation out when the context window is full
(gptforge.prompts.history_start), which the chat CLI and the server's `truncate_history` both use."""

import pytest

from gptforge.prompts import history_start
from gptforge.tokenizer import ByteTokenizer

U, A, S = "user", "assistant", "system"


@pytest.mark.parametrize("roles, lengths, budget, start", [
    ([U], [50], 100, 0),  # fits
    ([U, A, U], [10, 10, 10], 30, 0),  # fits exactly
    ([U, A, U, A, U], [10, 10, 10, 10, 10], 49, 2),  # one exchange goes: a user message and its reply
    ([U, A, U, A, U], [10, 10, 10, 10, 10], 29, 4),  # both go
    ([U, A, U, A, U], [10, 10, 10, 10, 10], 5, 4),  # the newest message stays, even when it cannot fit
    ([U, U, A, U], [10, 10, 10, 10], 35, 1),  # a question left unanswered is an exchange of its own
    ([U, A, A, U], [10, 10, 10, 10], 25, 3),  # a reply in two messages goes with its question
    ([U, A, U, A], [10, 10, 10, 10], 25, 2),  # the newest message may be a reply to continue
    ([S, U, A, U], [40, 10, 10, 10], 70, 0),  # a system message stays and costs its tokens
    ([S, U, A, U], [40, 10, 10, 10], 69, 3),
    ([S, U, A, U], [40, 10, 10, 10], 10, 3),
    ([U, A, S, U, A, U], [10, 10, 5, 10, 10, 10], 35, 3),  # system messages stay wherever they are
    ([U, A, S, U, A, U], [10, 10, 5, 10, 10, 10], 34, 5),
])
def test_history_start(roles, lengths, budget, start):
    assert history_start(roles, lengths, budget) == start


def test_history_start_over_the_tokenizers_rendering():
    """With lengths from encode_chat of each message alone, the kept conversation renders to their sum:
    the longest tail of whole exchanges that fits."""
    tok = ByteTokenizer()
    tok.add_chat_tokens()
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i}" * (i + 1)}, {"role": "assistant", "content": "ok"}]
    messages.append({"role": "user", "content": "last"})
    lengths = [len(tok.encode_chat([m], add_generation_prompt=i == len(messages) - 1)[0])
               for i, m in enumerate(messages)]

    def rendered(start: int) -> int:
        kept = [m for i, m in enumerate(messages) if i >= start or m["role"] == "system"]
        return len(tok.encode_chat(kept, add_generation_prompt=True)[0])

    assert rendered(0) == sum(lengths)
    for budget in range(rendered(len(messages) - 1), rendered(0) + 1, 7):
        start = history_start([m["role"] for m in messages], lengths, budget)
        assert rendered(start) <= budget
        # whole exchanges only, and one exchange fewer left out would not fit
        assert start == 0 or (messages[start]["role"] == "user" and rendered(start - 2) > budget)
