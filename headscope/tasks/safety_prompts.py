"""Harmful-query prompt sets for the safety-head analyses (Zhou et al. 2024, "On the Role of
Attention Heads in LLM Safety").

headscope ships no harmful text. Users bring their own files:

- CSV with a column (AdvBench: ``goal``; JailbreakBench: ``Goal``),
- JSONL, one object per line (pick the field with ``column``) or one JSON string per line,
- plain text, one query per line (MaliciousInstruct).

Prompts use the reference code's template ``"## Query: {q}\\n## Answer:"`` (no chat template), or
the model's chat template with ``template="chat"``, or any string with a ``{q}`` field.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Sequence

import pandas as pd

from headscope.data import json_kind, read_jsonl
from headscope.errors import HeadscopeError
from headscope.validate import read_text

REFERENCE_TEMPLATE = "## Query: {q}\n## Answer:"
DEFAULT_COLUMNS = ("goal", "Goal", "prompt", "query", "instruction", "question")


def _pick_column(available: Sequence[str], column: str | None, path: Path) -> str:
    if column is not None:
        if column not in available:
            raise HeadscopeError(
                f"{path} has no column {column!r}; its columns are {list(available)}. Pass one with --column"
            )
        return column
    for name in DEFAULT_COLUMNS:
        if name in available:
            return name
    raise HeadscopeError(
        f"{path}: cannot tell which column holds the queries (columns {list(available)}); pass --column NAME "
        "(AdvBench: goal, JailbreakBench: Goal)"
    )


def load_prompts(path: str | Path, column: str | None = None, limit: int | None = None) -> list[str]:
    """Queries from a JSONL (or JSON array), CSV or one-per-line text file. JSON is told by the
    content, whatever the name; a CSV by its .csv / .tsv name (a plain-text file whose first line is
    a CSV header, or read with ``column``, is refused: name it .csv).

    ``column``: the CSV column / JSON field holding the query (default: the first of
    goal, Goal, prompt, query, instruction, question that exists). ``limit``: keep the first n.
    """
    path = Path(path)
    text = read_text(path, "prompt file")
    suffix = path.suffix.lower()
    if json_kind(text) is not None:
        suffix = ".jsonl"
    elif suffix not in (".csv", ".tsv", ".json", ".jsonl"):
        _check_plain(text, column, path)
    if suffix in (".csv", ".tsv"):
        try:
            frame = pd.read_csv(io.StringIO(text), sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise HeadscopeError(f"{path} is not a readable CSV ({exc})") from None
        queries = frame[_pick_column(list(frame.columns), column, path)].tolist()
    elif suffix in (".jsonl", ".json"):
        queries = []
        for lineno, row in read_jsonl(path, "prompt file", "give one object or string per line"):
            if isinstance(row, str):
                queries.append(row)
            elif isinstance(row, dict):
                queries.append(str(row[_pick_column(list(row), column, Path(f"{path}:{lineno}"))]))
            else:
                raise HeadscopeError(f"{path}:{lineno} must be a JSON object or string; got {type(row).__name__}")
    else:
        queries = text.splitlines()
    queries = [q.strip() for q in queries if q and q.strip()]
    if limit is not None:
        queries = queries[:limit]
    if not queries:
        raise HeadscopeError(f"{path} holds no queries")
    return queries


def _check_plain(text: str, column: str | None, path: Path) -> None:
    """A one-query-per-line file must not be a CSV in disguise (its header would become a query)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    fields = [f.strip().strip('"') for f in re.split(r"[,\t]", first)]
    header = len(fields) > 1 and any(f in (*DEFAULT_COLUMNS, column) for f in fields)
    if header or column is not None:
        raise HeadscopeError(f"{path} is read as plain text, one query per line"
                             + (f", but its first line {first[:60]!r} is a CSV header" if header else
                                f"; --column {column} picks a CSV column or JSON field")
                             + "; name a CSV *.csv (tab-separated: *.tsv), JSON Lines *.jsonl")


def format_prompt(query: str, tokenizer=None, template: str = "reference") -> str:
    """The prompt text: ``reference`` ("## Query: {q}\\n## Answer:"), ``chat`` (the tokenizer's
    chat template, one user turn, generation prompt added) or a custom string with ``{q}``."""
    if template == "reference":
        return REFERENCE_TEMPLATE.format(q=query)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise HeadscopeError(
                "template 'chat' needs a tokenizer with a chat template; this model has none. "
                "Use the reference template instead"
            )
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": query}], add_generation_prompt=True, tokenize=False
        )
    if "{q}" not in template:
        raise HeadscopeError(f"template must be 'reference', 'chat' or a string containing {{q}}; got {template!r}")
    return template.replace("{q}", query)


def encode_prompts(tokenizer, queries: Sequence[str], template: str = "reference") -> list[list[int]]:
    """Token ids of each formatted prompt (BOS added by the tokenizer, except for chat templates,
    which carry their own)."""
    if tokenizer is None:
        raise HeadscopeError("encoding prompts needs the model's tokenizer; this model was loaded without one")
    special = template != "chat"
    return [list(tokenizer(format_prompt(q, tokenizer, template), add_special_tokens=special).input_ids) for q in queries]
