"""Fine-tuning data: files -> examples -> train/val/test splits. Token ids and batches: data/batches.py.

File formats (every file is UTF-8; a byte-order mark is ignored; CRLF line ends read as LF):

text (`read_text_corpus`): a .txt file or a folder of .txt files (sorted, recursive), or a .jsonl file.
  - documents="paragraph" (default): a blank line (one or more empty or whitespace-only lines) ends a
    document, and so does the end of a file. documents="file": each file is one document.
  - delimiters=("<LOC>", "</LOC>"): each span between the two is a document; text outside is ignored.
    An opening delimiter written as a tag (`<LOC>`) may carry a control tag: `<LOC tag="dark">`. A tag
    is a control-token name (prompts.tag_token) that also holds no '"'; an opening that starts like a
    tagged one but is not (`<LOC tag=dark>`, `<LOC tag="a"b">`) is an error. `document_block` writes
    this format, `parse_delimiters` reads the 'OPEN,CLOSE' option.
  - .jsonl: one document per line, {"text": ..., "tag": ... (optional)} (field names configurable).
  Documents are stripped of surrounding whitespace; an empty one is an error naming its place.
classify (`read_labeled`): .tsv, .csv, .jsonl or .json (a list of objects).
  - TSV/CSV: text and label fields given as 0-based column indexes ("1", "0") mean a file without a
    header. Otherwise the first row is a header when it names the columns; a first row that names
    neither "text" nor "label" (with the default field names) is data laid out label, text (the SMS
    Spam Collection layout). Every row has the first row's number of fields. TSV is split on tabs with
    no quoting (SMS texts hold unbalanced quotes); CSV follows RFC 4180 quoting.
  - Class names are the distinct labels, sorted (numerically when all are integers).
instruct (`read_instructions`): Alpaca rows {"instruction", "input" (optional), "output"} in .json
  (a list) or .jsonl.
chat (`read_conversations`): .jsonl (or a .json list) whose items are {"messages": [{role, content}...]},
  a bare list of messages, or an OpenAssistant export tree ({"message_tree_id", "prompt": {"text",
  "role", "replies": [...], "rank"?}}). Trees give conversations by `oasst_paths` (see `tree_paths`).

Splits (`split_examples`) are seeded and stratified by class when labels are given; each split keeps
file order, so a fixed seed gives a fixed, documented train/val/test split.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

from gptforge.common import UserError, iter_jsonl
from gptforge.prompts import check_instruction, check_messages, tag_token

DOCUMENT_RULES = ("paragraph", "file")
OASST_PATHS = ("all", "top")
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
_BLANK_LINES = re.compile(r"\n[ \t\f\v]*\n\s*")  # after universal newlines, so \r\n is already \n


class Document(NamedTuple):
    text: str
    tag: Optional[str] = None


class TextCorpus(NamedTuple):
    documents: list[Document]
    tags: list[str]  # sorted distinct tags: the driver adds their tokens (Tokenizer.add_tag_tokens)


class LabeledText(NamedTuple):
    text: str
    label: str


class LabeledData(NamedTuple):
    examples: list[LabeledText]
    class_names: list[str]  # index = class id


# --- files ---------------------------------------------------------------------------------------------
def _existing_file(path: Path | str, what: str, suffixes: Sequence[str]) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"{path} is a folder; {what} data must be one {'/'.join(suffixes)} file")
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{path}: {what} data must be a {'/'.join(suffixes)} file (the suffix decides the format)")
    return path


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:  # newline=None: \r\n and \r read as \n
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def _json_items(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, item) for each line of a .jsonl file or each element of a .json list."""
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise UserError(f"{path} must hold a JSON list of examples (use .jsonl for one per line)")
        for i, item in enumerate(items):
            yield f"{path} item {i}", item
        return
    for lineno, item in iter_jsonl(text.split("\n"), path, "; each line must be one JSON value"):
        yield f"{path}:{lineno}", item


def _non_empty(items: list, path: Path, what: str) -> list:
    if not items:
        raise UserError(f"{path} holds no {what}")
    return items


# --- text -------------------------------------------------------------------------------------------
def read_text_corpus(path: Path | str, documents: str = "paragraph",
                     delimiters: Optional[Sequence[str]] = None,
                     text_field: str = "text", tag_field: str = "tag") -> TextCorpus:
    """Documents for domain adaptation (rules in the module docstring), in file order."""
    if documents not in DOCUMENT_RULES:
        raise UserError(f"unknown document rule '{documents}'; use {' or '.join(DOCUMENT_RULES)}")
    if delimiters is not None:
        if len(delimiters) != 2 or not all(isinstance(d, str) and d for d in delimiters):
            raise UserError(f"delimiters must be two non-empty strings (open, close), got {delimiters!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"folder {path} holds no .txt files; put text files in it or point at a file")
    else:
        files = [path]
    docs: list[Document] = []
    for f in files:
        if f.suffix.lower() == ".jsonl":
            if delimiters is not None:
                raise UserError(f"{f}: delimiters apply to text files; a .jsonl file has one document per line")
            docs += _jsonl_documents(f, text_field, tag_field)
        elif delimiters is not None:
            docs += _delimited_documents(f, delimiters[0], delimiters[1])
        else:
            docs += _plain_documents(f, documents)
    _non_empty(docs, path, "documents")
    return TextCorpus(docs, sorted({d.tag for d in docs if d.tag is not None}))


def _plain_documents(path: Path, rule: str) -> list[Document]:
    text = _read_text(path)
    if rule == "file":
        if not text.strip():
            raise UserError(f"document {path} is empty; remove it or add text")
        return [Document(text.strip())]
    return [Document(part.strip()) for part in _BLANK_LINES.split(text) if part.strip()]


def parse_delimiters(spec: str, option: str = "--delimiters") -> tuple[str, str]:
    """'<LOC>,</LOC>' -> ('<LOC>', '</LOC>'); `option` names the flag in the error."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise UserError(f"{option} takes 'OPEN,CLOSE' (e.g. '<LOC>,</LOC>'), got {spec!r}")
    return parts[0], parts[1]


def takes_tags(open_delim: str) -> bool:
    """Whether an opening delimiter can carry a tag: it is written as a tag itself, `<LOC>`."""
    return open_delim.startswith("<") and open_delim.endswith(">")


def opening_stem(open_delim: str) -> str:
    """What every opening starts with: '<LOC' for '<LOC>' (which may carry a tag), else the delimiter."""
    return open_delim[:-1] if takes_tags(open_delim) else open_delim


def check_document_tag(tag: str, where: Optional[str] = None) -> str:
    """A tag as a delimited file holds it (`<LOC tag="dark">`): a control-token name without '"'."""
    try:
        tag_token(tag)
        if '"' in tag:
            raise UserError(f"invalid tag {tag!r}: a tag written into an opening (<LOC tag=\"...\">) may "
                            "not contain '\"'")
    except UserError as e:
        raise UserError(f"{where}: {e}" if where else str(e)) from None
    return tag


def document_block(text: str, tag: Optional[str], delimiters: Sequence[str]) -> str:
    """One document as `read_text_corpus(..., delimiters=...)` reads it back: the opening (with the tag:
    `<LOC tag="dark">`), the text, the closing and a blank line."""
    open_delim, close_delim = delimiters
    opening = open_delim
    if tag is not None:
        if not takes_tags(open_delim):
            raise UserError(f"tags are written into the opening delimiter (<LOC tag=\"x\">), so it must look "
                            f"like <NAME>; got {open_delim!r}")
        opening = f'{opening_stem(open_delim)} tag="{check_document_tag(tag)}">'
    candidate, _ = _opening_patterns(open_delim)
    if not text.strip() or close_delim in text or candidate.search(text):
        raise UserError(f"a document must be non-empty and hold no {open_delim} or {close_delim}, got {text[:40]!r}")
    return f"{opening}\n{text}\n{close_delim}\n\n"


def _opening_patterns(open_delim: str) -> tuple[re.Pattern, re.Pattern]:
    """(where an opening starts, the whole opening with group 1 = the tag). `<LOC>` also matches
    `<LOC tag="dark">`; other delimiters match literally (and carry no tag)."""
    if not takes_tags(open_delim):
        literal = re.compile(re.escape(open_delim) + "()")
        return literal, literal
    stem = re.escape(opening_stem(open_delim))
    return re.compile(stem + r"(?=\s*>|\s+tag=)"), re.compile(stem + r'(?:\s+tag="([^"\n]*)")?\s*>')


def _delimited_documents(path: Path, open_delim: str, close_delim: str) -> list[Document]:
    text = _read_text(path)
    candidate, opening = _opening_patterns(open_delim)
    docs, pos = [], 0
    while (c := candidate.search(text, pos)) is not None:
        where = f"{path}:{text.count(chr(10), 0, c.start()) + 1}"
        m = opening.match(text, c.start())
        if m is None:
            shown = text[c.start():].split("\n", 1)[0][:60]
            raise UserError(f'{where}: malformed opening {shown!r}; write {open_delim} or '
                            f'{opening_stem(open_delim)} tag="name"> (a tag holds no \'"\' or line break)')
        end = text.find(close_delim, m.end())
        nested = candidate.search(text, m.end(), end if end >= 0 else len(text))
        if end < 0 or nested is not None:
            raise UserError(f"{where}: {m.group(0)} is not closed by {close_delim} before the next document")
        body = text[m.end():end].strip()
        if not body:
            raise UserError(f"{where}: the document is empty; remove it or add text")
        tag = m.group(1)
        if tag is not None:
            check_document_tag(tag, where)
        docs.append(Document(body, tag))
        pos = end + len(close_delim)
    if not docs:
        raise UserError(f"{path} holds no {open_delim}...{close_delim} documents; check --delimiters")
    return docs


def _check_tag(tag: str, where: str) -> None:
    try:
        tag_token(tag)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _jsonl_documents(path: Path, text_field: str, tag_field: str) -> list[Document]:
    docs = []
    for where, row in _json_items(path):
        text = _field(row, text_field, where)
        if not text.strip():
            raise UserError(f"{where}: the document is empty; remove it or add text")
        tag = row.get(tag_field)
        if tag is not None:
            if not isinstance(tag, str):
                raise UserError(f"{where}: '{tag_field}' must be a string, got {type(tag).__name__}")
            _check_tag(tag, where)
        docs.append(Document(text.strip(), tag))
    return docs


def _field(row: Any, name: str, where: str) -> str:
    if not isinstance(row, Mapping):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise UserError(f"{where}: no '{name}' field (fields: {', '.join(map(str, row)) or 'none'})")
    value = row[name]
    if not isinstance(value, str):
        raise UserError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
    return value


# --- classify ----------------------------------------------------------------------------------------
def read_labeled(path: Path | str, text_field: str = "text", label_field: str = "label") -> LabeledData:
    """Texts with class labels (rules in the module docstring)."""
    path = _existing_file(path, "classification", (".tsv", ".csv", ".jsonl", ".json"))
    if path.suffix.lower() in (".tsv", ".csv"):
        rows = _delimited_rows(path, text_field, label_field)
    else:
        rows = [(where, _field(row, text_field, where), _label(row, label_field, where))
                for where, row in _json_items(path)]
    examples = []
    for where, text, label in rows:
        if not text.strip():
            raise UserError(f"{where}: the text is empty; remove the row or add text")
        if not label.strip():
            raise UserError(f"{where}: the label is empty")
        examples.append(LabeledText(text, label))
    _non_empty(examples, path, "examples")
    names = sorted({e.label for e in examples})
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        names.sort(key=int)
    return LabeledData(examples, names)


def _label(row: Any, name: str, where: str) -> str:
    if isinstance(row, Mapping) and isinstance(row.get(name), (int, str)) and not isinstance(row[name], bool):
        return str(row[name])
    if isinstance(row, Mapping) and name in row:
        raise UserError(f"{where}: label '{name}' must be a string or an integer, got {type(row[name]).__name__}")
    return _field(row, name, where)  # raises the missing-field error


def _delimited_rows(path: Path, text_field: str, label_field: str) -> list[tuple[str, str, str]]:
    tsv = path.suffix.lower() == ".tsv"
    with open(path, encoding="utf-8-sig", newline="") as f:  # csv handles \r\n itself
        try:
            if tsv:
                reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            else:
                reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if row]
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: cannot parse the CSV ({e})") from None
    if not rows:
        raise UserError(f"{path} holds no examples")
    header = rows[0][1]
    if text_field.isdigit() and label_field.isdigit():
        text_i, label_i, width = int(text_field), int(label_field), len(header)
    elif text_field in header and label_field in header:
        text_i, label_i = header.index(text_field), header.index(label_field)
        width, rows = len(header), rows[1:]
    elif (text_field, label_field) == ("text", "label") and not {"text", "label"} & set(header):
        text_i, label_i, width = 1, 0, len(header)  # headerless: label<TAB>text, the SMS Spam layout
    else:
        missing = label_field if label_field not in header else text_field
        raise UserError(f"{path} has no column '{missing}'; its first row is {header!r} (name the columns in "
                        "a header row, or give 0-based column indexes as the text and label fields)")
    if max(text_i, label_i) >= width:
        raise UserError(f"{path}: column index {max(text_i, label_i)} is out of range; rows have {width} columns")
    out = []
    for lineno, row in rows:
        if len(row) != width:
            sep = "tab" if tsv else "comma"
            raise UserError(f"{path}:{lineno}: {len(row)} {sep}-separated fields, expected {width}"
                            + ("; TSV text may not contain tabs" if tsv else ""))
        out.append((f"{path}:{lineno}", row[text_i], row[label_i]))
    return out


# --- instruct ------------------------------------------------------------------------------------------
def read_instructions(path: Path | str) -> list[dict]:
    """Alpaca examples as {'instruction', 'input', 'output'} dicts ('input' is "" when absent)."""
    path = _existing_file(path, "instruct", (".json", ".jsonl"))
    out = []
    for where, row in _json_items(path):
        try:
            instruction, input_, output = check_instruction(row)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        out.append({"instruction": instruction, "input": input_, "output": output})
    return _non_empty(out, path, "examples")


# --- chat ------------------------------------------------------------------------------------------------
def read_conversations(path: Path | str, oasst_paths: str = "all") -> list[list[dict]]:
    """Conversations as [{'role', 'content'}, ...] lists (formats in the module docstring)."""
    path = _existing_file(path, "chat", (".jsonl", ".json"))
    if oasst_paths not in OASST_PATHS:
        raise UserError(f"unknown oasst_paths '{oasst_paths}'; use {' or '.join(OASST_PATHS)}")
    out = []
    for where, item in _json_items(path):
        if isinstance(item, Mapping) and isinstance(item.get("prompt"), Mapping):
            out += tree_conversations(item["prompt"], oasst_paths, where)
            continue
        if isinstance(item, Mapping) and "messages" not in item:
            raise UserError(f"{where}: expected {{\"messages\": [...]}}, a list of messages or an "
                            "OpenAssistant tree")
        try:
            pairs = check_messages(item["messages"] if isinstance(item, Mapping) else item)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if not any(role == "assistant" for role, _ in pairs):
            raise UserError(f"{where}: the conversation has no assistant message, so nothing to learn from")
        out.append([{"role": role, "content": content} for role, content in pairs])
    return _non_empty(out, path, "conversations")


def tree_conversations(root: Mapping, paths: str = "all", where: str = "tree") -> list[list[dict]]:
    """Conversations from one OpenAssistant message tree (prompter -> user, assistant -> assistant).

    paths="all": every root-to-leaf path, cut after its last assistant message; a cut path that a longer
      one contains is dropped. So: one conversation per assistant message with no assistant below it.
    paths="top": from the root follow the reply with the lowest `rank` (a missing rank ranks last; ties
      keep file order) down to a leaf, cut after the last assistant message.
    Deleted messages (deleted: true, or review_result: false) are skipped with all their replies. A
    tree without an assistant reply gives no conversation."""
    if paths == "top":
        path, node = [], root
        while node is not None:
            path.append(_oasst_message(node, where))
            node = min(_replies(node), key=_rank_key, default=None)
        last = max((i for i, m in enumerate(path) if m["role"] == "assistant"), default=None)
        return [] if last is None else [path[: last + 1]]
    out: list[list[dict]] = []

    def walk(node: Mapping, path: list[dict]) -> bool:  # whether an assistant message is at or below node
        path = path + [_oasst_message(node, where)]
        below = False
        for reply in _replies(node):
            below |= walk(reply, path)
        is_assistant = path[-1]["role"] == "assistant"
        if is_assistant and not below:
            out.append(path)
        return below or is_assistant

    if _usable(root):
        walk(root, [])
    return out


def _usable(node: Any) -> bool:
    return isinstance(node, Mapping) and not node.get("deleted") and node.get("review_result") is not False


def _replies(node: Mapping) -> list[Mapping]:
    replies = node.get("replies") or []
    return [r for r in replies if _usable(r)] if isinstance(replies, list) else []


def _rank_key(node: Mapping) -> tuple[bool, float]:
    rank = node.get("rank")
    ranked = isinstance(rank, (int, float)) and not isinstance(rank, bool)
    return (not ranked, rank if ranked else 0.0)


def _oasst_message(node: Mapping, where: str) -> dict:
    role, text = OASST_ROLES.get(node.get("role")), node.get("text")
    if role is None or not isinstance(text, str):
        raise UserError(f"{where}: an OpenAssistant message needs 'text' and a role of prompter or assistant "
                        f"(got role {node.get('role')!r})")
    return {"role": role, "content": text}


# --- splits ------------------------------------------------------------------------------------------------
SPLITS = ("train", "val", "test")


def split_examples(items: Sequence, val_fraction: float, test_fraction: float = 0.0, seed: int = 0,
                   labels: Optional[Sequence] = None) -> dict[str, list]:
    """Seeded train/val/test split of whole items (a document is never cut). With labels, each class is
    split in the same proportions (stratified). Each split keeps the items' original order.

    Counts: round(n * fraction) per split (per class when stratified); an unstratified split that asks
    for a fraction > 0 gets at least one item."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(f"split fractions must be in [0, 1) and sum below 1, got val={val_fraction}, "
                        f"test={test_fraction}")
    if labels is not None and len(labels) != len(items):
        raise UserError(f"{len(labels)} labels for {len(items)} items")
    groups: dict[Any, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(labels[i] if labels is not None else None, []).append(i)
    rng = random.Random(seed)  # Python's Random is stable across versions: the split stays fixed
    chosen: dict[str, list[int]] = {name: [] for name in SPLITS}
    for key in sorted(groups, key=str):
        idx = groups[key]
        rng.shuffle(idx)
        n_val, n_test = (_count(len(idx), f, at_least_one=labels is None) for f in (val_fraction, test_fraction))
        if labels is not None and n_val + n_test >= len(idx):
            raise UserError(f"class '{key}' has {len(idx)} examples, too few to split; add examples or "
                            "lower the val/test fractions")
        chosen["val"] += idx[:n_val]
        chosen["test"] += idx[n_val:n_val + n_test]
        chosen["train"] += idx[n_val + n_test:]
    for name, fraction in zip(SPLITS, (1.0, val_fraction, test_fraction)):
        if fraction > 0 and not chosen[name]:
            raise UserError(f"{len(items)} examples are too few for a {name} split (fractions val="
                            f"{val_fraction}, test={test_fraction}); add data or change the fractions")
    return {name: [items[i] for i in sorted(idx)] for name, idx in chosen.items()}


def _count(n: int, fraction: float, at_least_one: bool) -> int:
    count = int(n * fraction + 0.5)
    return max(count, 1) if at_least_one and fraction > 0 else count
