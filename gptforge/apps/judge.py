"""Score model responses with an LLM judge behind an OpenAI-compatible chat endpoint.

Each JSONL line holds an instruction (optional input), the reference answer and the model's response, as
the instruct mode writes them. The judge is asked for a 0-100 score with a fixed rubric (the
LLMs-from-scratch ch. 7 evaluation prompt), at temperature 0, and the integer is read out of its reply.

Works with any server speaking POST {endpoint}/chat/completions: Ollama (http://localhost:11434/v1),
vLLM, llama.cpp, OpenAI, or gptforge's own server, through `gptforge.client.ChatClient`.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from gptforge.client import ChatClient, EndpointUnreachable, RequestFailed
from gptforge.common import UserError, atomic_write_text, iter_jsonl, read_user_text
from gptforge.options import JudgeOptions

RUBRIC = ("Given the input `{input}` and correct output `{reference}`, score the model response "
          "`{response}` on a scale from 0 to 100, where 100 is the best score. "
          "Respond with the integer number only.")
# Field names the instruct mode writes, then accepted aliases.
RESPONSE_FIELDS = ("response", "model_response")
REFERENCE_FIELDS = ("output", "reference")


# --- reading the judge's reply -----------------------------------------------------------------------
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)  # reasoning models' scratchpad
_NUMBER = r"(?<![\w.])(-?\d+(?:\.\d+)?)"
_OUT_OF_100 = re.compile(_NUMBER + r"\s*(?:/|out of)\s*100\b", re.IGNORECASE)
_SCALE = re.compile(r"\b0\s*(?:-|–|to)\s*100\b", re.IGNORECASE)  # "on a scale of 0 to 100" names no score


def parse_score(reply: str) -> Optional[int]:
    """The score in a judge's reply: an explicit "N/100" or "N out of 100" if present, else the first number
    in 0..100 ("85", "85.", "Score: 85", "**85**"); decimals round half up. None when there is none:
    an unparseable reply is a failed judgement, never a zero."""
    text = _THINKING.sub(" ", reply)
    explicit = _OUT_OF_100.search(text)
    candidates = [explicit.group(1)] if explicit else re.findall(_NUMBER, _SCALE.sub(" ", text))
    for number in candidates:
        value = float(number)
        if 0 <= value <= 100:
            return math.floor(value + 0.5)
    return None


# --- the judging run ------------------------------------------------------------------------------------
def read_items(path: Path) -> list[tuple[int, dict]]:
    """(line number, item) for each JSONL item, checked up front so a bad line fails before any request."""
    lines = read_user_text(path).splitlines()
    items = []
    for number, item in iter_jsonl(lines, path):
        if not isinstance(item, dict):
            raise UserError(f"{path} line {number}: expected a JSON object, got {type(item).__name__}")
        for names in (("instruction",), REFERENCE_FIELDS, RESPONSE_FIELDS):
            if not any(isinstance(item.get(n), str) for n in names):
                raise UserError(f"{path} line {number}: missing text field '{names[0]}'"
                                + (f" (or '{names[1]}')" if len(names) > 1 else ""))
        items.append((number, item))
    if not items:
        raise UserError(f"{path} has no items to judge")
    return items


def judge_prompt(item: dict) -> str:
    task = item["instruction"] + (f"\n\nInput: {item['input']}" if item.get("input") else "")
    reference = next(item[n] for n in REFERENCE_FIELDS if isinstance(item.get(n), str))
    response = next(item[n] for n in RESPONSE_FIELDS if isinstance(item.get(n), str))
    return RUBRIC.format(input=task, reference=reference, response=response)


def judge_item(client: ChatClient, item: dict) -> dict:
    """{score, judge_reply, error}: score None (and an error) when the item could not be judged."""
    messages = [{"role": "user", "content": judge_prompt(item)}]
    try:
        reply = client.complete(messages, temperature=0)
    except RequestFailed as e:
        return {"score": None, "judge_reply": None, "error": str(e)}
    score = parse_score(reply)
    return {"score": score, "judge_reply": reply, "error": None if score is not None else "no 0-100 score in reply"}


def judge_command(options: JudgeOptions) -> None:
    """`gptforge judge`: the report on the terminal, and as JSON with --json."""
    report = judge_file(Path(options.responses), options.endpoint, options.model, api_key=options.key(),
                        timeout=options.timeout, retries=options.retries,
                        out=Path(options.out) if options.out else None, concurrency=options.concurrency)
    print(format_report(report))
    if options.json:
        atomic_write_text(Path(options.json), json.dumps(report, indent=2) + "\n")


def judge_file(responses: Path, endpoint: str, model: str, *, api_key: Optional[str] = None,
               timeout: float = 60.0, retries: int = 3, out: Optional[Path] = None, concurrency: int = 1,
               progress: bool = True, backoff: float = 1.0) -> dict:
    """Judge every item of a responses JSONL file; returns the summary (see `summarize`).

    out: also write each item with its score, judge_reply and error as JSONL (input order). Items that
    could not be judged (timeouts, server errors after retries, replies without a score) are counted as
    failed and left out of the mean. An endpoint that cannot be reached at all raises UserError.
    """
    if concurrency < 1 or retries < 0 or not timeout > 0:
        raise UserError("concurrency must be >= 1, retries >= 0 and timeout > 0")
    items = read_items(Path(responses))
    client = ChatClient(endpoint, model, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff)
    from tqdm.auto import tqdm

    results: list[dict] = []
    # no `with`: its exit would wait for the requests in flight, also after a failure that ends the run
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        with tqdm(total=len(items), desc="judging", unit="item", disable=not progress, dynamic_ncols=True) as bar:
            futures = [pool.submit(judge_item, client, item) for _, item in items]
            for future in futures:
                try:
                    results.append(future.result())
                except EndpointUnreachable as e:
                    raise UserError(f"cannot reach {client.endpoint} ({e}) after {retries + 1} attempts; "
                                    "is the server running?") from None
                bar.update(1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a finished run has nothing left; a failed one stops
    if out is not None:
        atomic_write_text(Path(out), "".join(json.dumps({**item, **result}, ensure_ascii=False) + "\n"
                                             for (_, item), result in zip(items, results)))
    lines = [number for number, _ in items]
    return {"file": str(responses), "model": model, "endpoint": client.endpoint, **summarize(results, lines)}


def summarize(results: list[dict], lines: list[int]) -> dict:
    """total, scored, failed, mean/median of the scores, histogram by tens ("90-100" holds the 100s), and
    the first failures with their line numbers."""
    scores = [r["score"] for r in results if r["score"] is not None]
    histogram = {f"{lo}-{lo + 9 if lo < 90 else 100}": 0 for lo in range(0, 100, 10)}
    for s in scores:
        lo = min(s // 10, 9) * 10
        histogram[f"{lo}-{lo + 9 if lo < 90 else 100}"] += 1
    failures = [{"line": n, "error": r["error"]} for n, r in zip(lines, results) if r["score"] is None]
    return {"total": len(results), "scored": len(scores), "failed": len(failures),
            "mean": statistics.fmean(scores) if scores else None,
            "median": statistics.median(scores) if scores else None,
            "histogram": histogram, "failures": failures[:20]}


def format_report(report: dict) -> str:
    """A few lines for the terminal: mean and counts, then the histogram as bars."""
    mean = f"{report['mean']:.1f}" if report["mean"] is not None else "n/a"
    lines = [f"judge {report['model']}: mean score {mean} over {report['scored']} of {report['total']} items"
             f" ({report['failed']} failed)"]
    width = max(report["histogram"].values()) or 1
    for bucket, count in report["histogram"].items():
        lines.append(f"  {bucket:>6} | {'#' * round(30 * count / width):<30} {count}")
    lines += [f"  line {f['line']}: {f['error']}" for f in report["failures"][:5]]
    return "\n".join(lines)
