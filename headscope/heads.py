"""Heads by name: the one parser and the one printed form of a (layer, head) pair.

Accepted, alone or in lists separated by commas and/or spaces (case-insensitive)::

    L5H1    5.1    (5,1)    [5, 1]    L5H1,L6H2    5.1 6.2    (5,1),(6,2)

Printed everywhere as ``L5H1`` (:func:`format_heads`: ``L5H1, L6H2``); ranking CSVs keep their
``layer,head`` columns.

    parse_heads("L1H5, 1.4")      # [(1, 5), (1, 4)]
    format_heads([(1, 5), (1, 4)])  # "L1H5, L1H4"
"""

from __future__ import annotations

import random
import re
from typing import Iterable, Sequence

import torch

from headscope.errors import HeadscopeError

Head = tuple[int, int]

EXAMPLES = "L5H1, 5.1 or (5,1); lists separated by commas or spaces, e.g. L5H1,L6H2"

_ONE_HEAD = re.compile(
    r"L(?P<l1>\d+)\s*H(?P<h1>\d+)"  # L5H1
    r"|[(\[]\s*(?P<l2>\d+)\s*,\s*(?P<h2>\d+)\s*[)\]]"  # (5,1) or [5,1]
    r"|(?P<l3>\d+)\.(?P<h3>\d+)(?![\d.])",  # 5.1
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"[\s,;\[\]]*")  # what may lie between heads (an outer [...] list included)


def parse_heads(text: str) -> list[Head]:
    """The heads named in ``text`` as (layer, head) pairs, in the order written, duplicates dropped."""
    if not isinstance(text, str):
        raise HeadscopeError(f"heads must be given as text ({EXAMPLES}); got {type(text).__name__}")
    heads: list[Head] = []
    pos = 0
    for match in _ONE_HEAD.finditer(text):
        _check_separators(text, text[pos : match.start()])
        layer = match.group("l1") or match.group("l2") or match.group("l3")
        head = match.group("h1") or match.group("h2") or match.group("h3")
        pair = (int(layer), int(head))
        if pair not in heads:
            heads.append(pair)
        pos = match.end()
    _check_separators(text, text[pos:])
    if not heads:
        raise HeadscopeError(f"no heads in {text!r}: write heads as {EXAMPLES}")
    return heads


def _check_separators(text: str, between: str) -> None:
    if not _SEPARATORS.fullmatch(between):
        raise HeadscopeError(f"cannot read {between.strip()!r} in {text!r} as a head: write heads as {EXAMPLES}")


def as_heads(heads: str | Iterable) -> list[Head]:
    """Heads from text (:func:`parse_heads`) or from an iterable of pairs / head names."""
    if isinstance(heads, str):
        return parse_heads(heads)
    out: list[Head] = []
    for item in heads:
        if isinstance(item, str):
            out.extend(parse_heads(item))
            continue
        try:
            layer, head = item
            if isinstance(layer, bool) or isinstance(head, bool):  # JSON true/false are not indices
                raise ValueError
            if int(layer) != layer or int(head) != head:
                raise ValueError
            out.append((int(layer), int(head)))
        except (TypeError, ValueError):
            raise HeadscopeError(f"a head is a (layer, head) pair of integers or a name like L5H1; got {item!r}") from None
    return out


def format_head(head: Sequence[int]) -> str:
    """``L5H1``: the one way headscope prints a head."""
    layer, head_index = head
    return f"L{int(layer)}H{int(head_index)}"


def format_heads(heads: Iterable[Sequence[int]]) -> str:
    """``L5H1, L6H2`` (``none`` for no heads)."""
    names = [format_head(h) for h in heads]
    return ", ".join(names) if names else "none"


def same_layer_random_heads(heads: Sequence[Head], n_heads: int, rng: random.Random,
                            exclude_given: bool = True) -> list[Head]:
    """Random heads with the same count per layer as ``heads``: the random-head control of head
    pursuit (Basile et al. 2025) and VHR (He et al. 2025). ``exclude_given`` draws only heads not in
    ``heads`` (when a layer has too few others, from all of that layer's heads)."""
    given = set(heads)
    chosen = []
    for layer in sorted({h[0] for h in heads}):
        count = sum(1 for h in heads if h[0] == layer)
        pool = [x for x in range(n_heads) if not (exclude_given and (layer, x) in given)]
        if len(pool) < count:
            pool = list(range(n_heads))
        chosen += [(layer, x) for x in sorted(rng.sample(pool, count))]
    return chosen


def head_masks(heads: Iterable[Head], n_layers: int, n_heads: int) -> torch.Tensor:
    """Boolean [layers, heads] mask, True on the given heads (the one head-mask builder)."""
    mask = torch.zeros(n_layers, n_heads, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask
