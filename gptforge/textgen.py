"""Text in, text out: prompts are encoded, the engine generates ids, and ids become text again.

What this layer adds to the token-level engine:
- An empty prompt starts from the end-of-text token, and end-of-text ends a row (it is not shown).
- Stop strings: a row ends as soon as one appears in its text, and the text is cut before it.
- Streaming: text deltas per row, decoded incrementally so a multi-byte UTF-8 character split across
  byte-level tokens is shown whole, and held back while it could still be the start of a stop string.
- `num_samples` samples per prompt in one batch: row i*num_samples + j is sample j of prompt i.
The returned text is the completion only, without the prompt.
"""

from __future__ import annotations

import codecs
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from gptforge.common import Runtime, UserError, read_user_text
from gptforge.config import SampleConfig
from gptforge.engine import Engine, SamplingParams, StepOutput
from gptforge.options import GenerateOptions
from gptforge.tokenizer import Tokenizer

Prompt = Union[str, Sequence[int]]  # text, or ids already rendered by the tokenizer
Where = Union[Runtime, torch.device, str, None]  # a Runtime, a bare device (no autocast), or the model's device


def generate_text(model: Union[torch.nn.Module, Engine], tokenizer: Tokenizer, prompts: Sequence[Prompt],
                  sample: SampleConfig, runtime: Where = None, truncate: Optional[str] = None,
                  stop_ids: Sequence[int] = ()) -> list[str]:
    """Completions, num_samples per prompt (prompt-major order), each cut before its first stop string.
    A prompt is text, or token ids already rendered by the tokenizer (a chat or instruction format);
    stop_ids end a row besides end-of-text (e.g. the chat end-of-turn token). runtime: where the model
    runs (`gptforge.common.inference_runtime`; an Engine brings its own)."""
    engine, rows, params, texts = _setup(model, tokenizer, prompts, sample, runtime, stop_ids)
    outputs = engine.generate(rows, params, stop_check=texts.stop_check, truncate=truncate)
    # Decoded in one go, independently of the incremental decoding that streaming uses.
    return [cut_at_stop(tokenizer.decode(ids), sample.stop) for ids in outputs]


def stream_text(model: Union[torch.nn.Module, Engine], tokenizer: Tokenizer, prompts: Sequence[Prompt],
                sample: SampleConfig, runtime: Where = None, truncate: Optional[str] = None,
                stop_ids: Sequence[int] = ()) -> Iterator[tuple[int, str]]:
    """(row index, text delta) as text becomes safe to show; the deltas of a row concatenate to what
    `generate_text` returns for it. Row i*num_samples + j is sample j of prompt i."""
    engine, rows, params, texts = _setup(model, tokenizer, prompts, sample, runtime, stop_ids)
    steps = engine.stream(rows, params, stop_check=texts.stop_check, truncate=truncate)  # raises bad input now
    return _stream_deltas(steps, texts)


def _stream_deltas(steps, texts: "TextRows") -> Iterator[tuple[int, str]]:
    for step in steps:
        yield from texts.update(step)
    yield from texts.close()  # rows the engine never finished (max_new_tokens == 0, or cut short)


def generate_command(options: GenerateOptions) -> None:
    """`gptforge generate`: each prompt followed by its completions (streamed to a terminal, or --stream true)."""
    from gptforge.checkpoint import load_for_inference

    prompts = [read_user_text(options.prompt_file, "prompt file")] if options.prompt_file else [options.prompt or ""]
    runtime = options.runtime()
    model, tokenizer, _ = load_for_inference(Path(options.checkpoint), runtime)
    sample, truncate = options.sample, options.truncate
    if options.streams(sys.stdout):
        for prompt in prompts:
            sys.stdout.write(prompt)
            for _, delta in stream_text(model, tokenizer, [prompt], sample, runtime, truncate=truncate):
                sys.stdout.write(delta)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return
    texts = generate_text(model, tokenizer, prompts, sample, runtime, truncate=truncate)
    per_prompt = len(texts) // len(prompts)
    for i, text in enumerate(texts):
        print(prompts[i // per_prompt] + text)
        if i < len(texts) - 1:
            print("-" * 40)


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt (text is encoded, ids kept); an empty prompt starts from end-of-text."""
    return [(tokenizer.encode(p) if isinstance(p, str) else list(p)) or [tokenizer.eot_id] for p in prompts]


def sampling_params(sample: SampleConfig, stop_token_ids: Sequence[int] = ()) -> SamplingParams:
    """The engine's parameters for a SampleConfig (whose stop strings and num_samples this module handles)."""
    return SamplingParams(max_new_tokens=sample.max_new_tokens, temperature=sample.temperature, top_k=sample.top_k,
                          top_p=sample.top_p, repetition_penalty=sample.repetition_penalty,
                          stop_token_ids=frozenset(stop_token_ids), seed=sample.seed)


def _setup(model, tokenizer: Tokenizer, prompts: Sequence[Prompt], sample: SampleConfig, runtime: Where,
           stop_ids: Sequence[int] = ()):
    engine = model if isinstance(model, Engine) else Engine(model, runtime)
    if engine.config.vocab_size != tokenizer.vocab_size:
        raise UserError(f"model vocab {engine.config.vocab_size} != tokenizer vocab {tokenizer.vocab_size}; "
                        "use the tokenizer the model was trained with")
    if isinstance(prompts, str):
        raise UserError("prompts must be a list of strings, not a single string")
    if sample.num_samples < 1:
        raise UserError(f"num_samples must be >= 1, got {sample.num_samples}")
    if any(not s for s in sample.stop):
        raise UserError("stop strings must not be empty")
    rows = [list(ids) for ids in encode_prompts(tokenizer, prompts) for _ in range(sample.num_samples)]
    params = sampling_params(sample, stop_token_ids={tokenizer.eot_id, *stop_ids})
    return engine, rows, params, TextRows(tokenizer, len(rows), sample.stop)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text before the earliest occurrence of any stop string (all of it if none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


class TextRows:
    """The text of every row of one engine call: `stop_check` ends a row at a stop string, `update` turns
    each StepOutput into the (row, text delta) pairs that are safe to show."""

    def __init__(self, tokenizer: Tokenizer, n_rows: int, stops: Sequence[str] = ()):
        self.rows = [RowText(tokenizer, stops) for _ in range(n_rows)]
        self.generated: list[list[int]] = [[] for _ in range(n_rows)]
        self.stop_check = self._stop_check if any(stops) else None  # None: the engine skips the call

    def _stop_check(self, b: int, ids: list[int]) -> bool:
        return self.rows[b].feed(ids)

    def update(self, step: StepOutput) -> list[tuple[int, str]]:
        deltas = []
        for b, (tok, why) in enumerate(zip(step.tokens, step.finished)):
            row = self.rows[b]
            if tok is not None:
                self.generated[b].append(tok)
                row.feed(self.generated[b])  # a no-op when stop_check has already fed this token
            if why is not None and not row.closed:
                row.close()
            delta = row.take()
            if delta:
                deltas.append((b, delta))
        return deltas

    def close(self) -> list[tuple[int, str]]:
        """End every row still open; returns their last deltas."""
        deltas = []
        for b, row in enumerate(self.rows):
            if not row.closed:
                row.close()
                delta = row.take()
                if delta:
                    deltas.append((b, delta))
        return deltas


class RowText:
    """The text of one generated row, built up token by token.

    feed() decodes new ids through an incremental UTF-8 decoder (an unfinished character waits for its
    remaining bytes) and looks for stop strings; take() hands out the text that is safe to show.
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.longest_stop = max(map(len, self.stops), default=0)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.n_fed = 0  # ids decoded so far
        self.emitted = 0  # characters handed out by take()
        self.stopped = False  # a stop string was found; text is cut before it
        self.closed = False  # no more ids will come

    def feed(self, ids: Sequence[int]) -> bool:
        """Decode ids[n_fed:] (ids is the row's whole generated list). Returns True once stopped."""
        if self.stopped or len(ids) <= self.n_fed:
            return self.stopped
        new = ids[self.n_fed:]
        self.n_fed = len(ids)
        self._append(self.decoder.decode(self.tokenizer.decode_bytes(new)))
        return self.stopped

    def close(self) -> None:
        """The row has ended: bytes of a character that never completed become U+FFFD."""
        if not self.stopped:
            self._append(self.decoder.decode(b"", final=True))
        self.closed = True

    def take(self) -> str:
        """Text not handed out yet that can no longer change: while the row runs, a tail that could be the
        beginning of a stop string is held back."""
        end = len(self.text)
        if not (self.closed or self.stopped):
            end -= self._stop_prefix_len()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _append(self, new: str) -> None:
        if not new:
            return
        # A stop string ending in the new text starts at most longest_stop - 1 characters before it.
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += new
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
