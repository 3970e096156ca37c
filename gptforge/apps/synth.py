"""Generate a fine-tuning corpus with an LLM behind an OpenAI-compatible endpoint (`gptforge synth`).

The fantasy-location recipe: ask a capable model the same prompt many times at a high temperature and keep
each distinct answer as one document, wrapped in delimiters that `gptforge finetune text
--finetune.delimiters` reads back:

    <LOC>
    A city carved into the cliffs ...
    </LOC>

With tags, the prompt's `{tag}` is filled in per request (the least represented tag first, so the corpus
stays balanced) and each document is written as `<LOC tag="dark">`, which the text mode turns into a
control token that generation can be conditioned on.

The output file is the state: each kept document is appended and flushed at once, so a killed run loses
at most the replies in flight, and running the command again counts the documents already there (and
dedups against them) and generates only the rest. Duplicates are compared after collapsing whitespace and
case. A run that keeps getting nothing new (failures, empty replies, duplicates) stops after
`max_misses` in a row instead of spending requests forever.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Optional, Sequence, TextIO

from gptforge.client import ChatClient, EndpointUnreachable, RequestFailed
from gptforge.common import UserError, atomic_write_text, read_user_text
from gptforge.data.examples import (check_document_tag, document_block, opening_stem, parse_delimiters,
                                    read_text_corpus, takes_tags)
from gptforge.options import SynthOptions

TAG_FIELD = "{tag}"


@dataclasses.dataclass
class SynthReport:
    """What one run did. total counts every document in the file, those from earlier runs included."""

    out: str
    total: int
    new: int = 0
    duplicates: int = 0
    empty: int = 0  # blank replies, and replies holding a stray delimiter (they would break the file)
    failed: int = 0  # requests that failed for good (timeouts, server errors after retries)


def normalise(text: str) -> str:
    """The duplicate key: the same words in the same order, whatever the spacing or case."""
    return " ".join(text.split()).casefold()


def extract_document(reply: str, delimiters: tuple[str, str]) -> Optional[str]:
    """The document in a reply: the text itself, or what is inside the delimiters when the model wrapped
    its answer in them (prompts often show the format). None when nothing usable is left."""
    open_delim, close_delim = delimiters
    text = reply.strip()
    stem = opening_stem(open_delim)
    start = re.search(re.escape(stem) + (r"[^>\n]*>" if stem != open_delim else ""), text)
    if start is not None and close_delim in text[start.end():]:
        text = text[start.end():text.index(close_delim, start.end())].strip()
    if not text or stem in text or close_delim in text:
        return None
    return text


def load_existing(out: Path, delimiters: tuple[str, str], log: TextIO = sys.stderr) -> list:
    """Documents already in `out` (an earlier or interrupted run). An unfinished document at the end, which
    only a crash in the middle of a write leaves, is removed so the file reads cleanly again."""
    if not out.exists():
        return []
    text = read_user_text(out)
    open_delim, close_delim = delimiters
    end = text.rfind(close_delim)
    head = text[:end + len(close_delim)] if end >= 0 else ""
    tail = text[len(head):].strip()
    stem = opening_stem(open_delim)
    if tail and (stem in tail or stem.startswith(tail)):
        atomic_write_text(out, head + "\n" if head else "")
        print(f"synth: removed an unfinished document at the end of {out} (an interrupted write)", file=log)
        text = head
    if stem not in text:
        if text.strip():
            raise UserError(f"{out} holds text but no {open_delim}...{close_delim} documents; give the "
                            "--delimiters it was written with, or another --out")
        return []
    return read_text_corpus(out, delimiters=delimiters).documents


def synth_command(options: SynthOptions) -> None:
    """`gptforge synth`: run, then say what the file holds and how to fine-tune on it."""
    prompt = read_user_text(options.prompt_file, "prompt file")
    tags = [t.strip() for t in options.tags.split(",") if t.strip()] if options.tags else []
    client = ChatClient(options.endpoint, options.model, api_key=options.key(), timeout=options.timeout,
                        retries=options.retries)
    r = synthesize(Path(options.out), client, prompt, options.n, delimiters=parse_delimiters(options.delimiters),
                   tags=tags, temperature=options.temperature, max_tokens=options.max_tokens,
                   concurrency=options.concurrency, max_misses=options.max_misses, progress=options.progress)
    print(f"{options.out}: {r.total} documents ({r.new} new; skipped {r.duplicates} duplicates, {r.empty} empty, "
          f"{r.failed} failed requests)")
    print(f"fine-tune on it: gptforge finetune text --from BASE --finetune.data {options.out} "
          f"--finetune.delimiters '{options.delimiters}'")


def synthesize(out: Path, client: ChatClient, prompt: str, n: int, *, delimiters: tuple[str, str] = ("<DOC>", "</DOC>"),
               tags: Sequence[str] = (), temperature: float = 1.0, max_tokens: Optional[int] = None,
               concurrency: int = 4, max_misses: int = 50, progress: bool = True) -> SynthReport:
    """Append documents to `out` until it holds n distinct ones (module docstring has the rules)."""
    out = Path(out)
    tags = list(tags)
    _check_args(prompt, n, delimiters, tags, concurrency, max_misses)
    existing = load_existing(out, delimiters)
    seen = {normalise(d.text) for d in existing}
    per_tag = Counter(d.tag for d in existing)
    report = SynthReport(str(out), total=len(existing))
    if report.total >= n:
        return report
    params = {"temperature": temperature, **({"max_tokens": max_tokens} if max_tokens else {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = out.exists() and out.stat().st_size > 0 and not out.read_bytes().endswith(b"\n")
    from tqdm.auto import tqdm

    misses, last_miss = 0, ""
    pending: dict[Future, Optional[str]] = {}
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        with open(out, "a", encoding="utf-8") as f, \
                tqdm(total=n, initial=report.total, desc="synth", unit="doc", disable=not progress,
                     dynamic_ncols=True) as bar:
            if needs_newline:
                f.write("\n")
            while report.total < n:
                while len(pending) < min(concurrency, n - report.total):  # no more in flight than still needed
                    tag = _next_tag(tags, per_tag, pending.values())
                    messages = [{"role": "user", "content": prompt.replace(TAG_FIELD, tag or "")}]
                    pending[pool.submit(client.complete, messages, **params)] = tag
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in [fu for fu in pending if fu in done]:  # submission order: deterministic
                    tag = pending.pop(future)
                    doc, counter, note = _outcome(future, delimiters, seen, client)
                    if doc is None:
                        setattr(report, counter, getattr(report, counter) + 1)
                        misses, last_miss = misses + 1, note
                    else:
                        seen.add(normalise(doc))
                        per_tag[tag] += 1
                        f.write(document_block(doc, tag, delimiters))
                        f.flush()  # a kill now loses nothing already counted
                        report.total, report.new, misses = report.total + 1, report.new + 1, 0
                        bar.update(1)
                    bar.set_postfix(dup=report.duplicates, empty=report.empty, failed=report.failed, refresh=False)
                    if report.total >= n:
                        break
                    if misses >= max_misses:
                        raise UserError(
                            f"{misses} requests in a row gave no new document (the last: {last_miss}); "
                            f"{report.total} documents are in {out}. Raise --temperature, vary the prompt or "
                            "use --tags, then run again to continue")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return report


def _check_args(prompt: str, n: int, delimiters: tuple[str, str], tags: list[str], concurrency: int,
                max_misses: int) -> None:
    if not prompt.strip():
        raise UserError("the prompt is empty; write the request for one document in --prompt_file")
    if n < 1 or concurrency < 1 or max_misses < 1:
        raise UserError("n, concurrency and max_misses must be >= 1")
    for tag in tags:
        check_document_tag(tag)  # the rule the text mode's reader applies to the tags it reads back
    if tags and not takes_tags(delimiters[0]):
        raise UserError(f"tags are written into the opening delimiter (<LOC tag=\"x\">), so it must look like "
                        f"<NAME>; got {delimiters[0]!r}")
    if bool(tags) != (TAG_FIELD in prompt):
        raise UserError("--tags and a {tag} field in the prompt go together: each request asks for one tag's "
                        "document" + (" (the prompt has no {tag})" if tags else " (no --tags given)"))


def _next_tag(tags: list[str], per_tag: Counter, in_flight) -> Optional[str]:
    """The tag with the fewest documents written or requested (ties: --tags order): round-robin that stays
    balanced across duplicates, failures and resumed runs."""
    if not tags:
        return None
    asked = Counter(in_flight)
    return min(tags, key=lambda t: per_tag[t] + asked[t])


def _outcome(future: Future, delimiters: tuple[str, str], seen: set[str],
             client: ChatClient) -> tuple[Optional[str], str, str]:
    """(document, "", "") for a new document, else (None, the SynthReport counter it adds to, what happened)."""
    try:
        reply = future.result()
    except RequestFailed as e:
        return None, "failed", f"a failed request: {e}"
    except EndpointUnreachable as e:
        raise UserError(f"cannot reach {client.endpoint} ({e}) after {client.retries + 1} attempts; "
                        "is the server running?") from None
    doc = extract_document(reply, delimiters)
    if doc is None:
        return None, "empty", "an empty reply, or one with a stray delimiter"
    if normalise(doc) in seen:
        return None, "duplicates", f"a duplicate of {doc[:40]!r}"
    return doc, "", ""
