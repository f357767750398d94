"""Rebuild the Stanford Politeness Corpus split (`train.jsonl`, `test.jsonl`) byte for byte from the raw source files.

Corpus: Danescu-Niculescu-Mizil, Sudhof, Jurafsky, Leskovec, Potts, "A computational approach to politeness with
application to social factors", ACL 2013. Cite the paper when you use the corpus.
Licence: the corpus files carry no licence statement (the Apache-2.0 licence of sudhof/politeness covers its code);
the request texts are user content from Wikipedia talk pages and the Stack Exchange dump, under CC BY-SA.

The rules, in the order of the data README (`politeness/README.md`) and of this module:
1. Read: the release CSVs of sudhof/politeness (Wikipedia, then Stack Exchange) in file order, plus the authors' 2014
   Wikipedia copy from sudhof/politeness-api, used only to restore escaped characters. All are pinned by sha256.
2. Label, per domain: `q1`, `q3` = `statistics.quantiles(scores, n=4, method="inclusive")`; polite if
   score >= q3, impolite if score <= q1, else unlabelled (those rows are left out of the split).
3. Clean (only this; all else verbatim): Wikipedia: decode well-formed HTML entities; restore `\\uXXXX` / `\\xNN`
   escapes that lost their backslash where the 2014 copy shows the escape; decode leftover `u2000`-`u206f`.
   Stack Exchange: CRLF inside a request becomes LF. Latin-1 leftovers such as `canxb4t` stay as they are.
4. Split: labelled rows are grouped by text ignoring case and whitespace; the groups are shuffled with
   `random.Random(2013)` and whole groups fill `test` to exactly 700 rows; the rest is `train`. Both keep file order.
5. Serialise: one `json.dumps` object per line (`id`, `domain`, `text`, `score`, `label`), UTF-8, not ASCII-escaped.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import random
import re
import statistics
from dataclasses import dataclass

from compress.errors import CompressError


@dataclass(frozen=True)
class SourceFile:
    name: str  # file name in the data directory's politeness/source/ folder
    repo: str  # GitHub owner/name
    commit: str
    path: str  # inside the repository
    sha256: str


_RELEASE = ("sudhof/politeness", "743ad25ad7b0cbf5f106ee4c68d87c450898dee7")  # branch python3, the Python 3 port
_API = ("sudhof/politeness-api", "c7384d85afb8a1881940a4d804ce78f9eafa7b60")  # the authors' 2014 copy

WIKIPEDIA = "wikipedia.annotated.csv.bak"
STACK_EXCHANGE = "stack-exchange.annotated.csv.bak"
WIKIPEDIA_2014 = "politeness-api.wikipedia.annotated.csv"

# the `.bak` files are the unmodified corpus; the branch head's `.csv` files flatten line breaks inside requests
SOURCES: tuple[SourceFile, ...] = (
    SourceFile(WIKIPEDIA, *_RELEASE, "corpora/wikipedia.annotated.csv.bak",
               "cb08fe2a27a6dd6354e2ce017c0b52d5641535d55908a97bfcd127889330115f"),
    SourceFile(STACK_EXCHANGE, *_RELEASE, "corpora/stack-exchange.annotated.csv.bak",
               "97c642c062d3c4702ef34a0954afab9b6ba520baed7d99b043339d7878076b5c"),
    SourceFile(WIKIPEDIA_2014, *_API, "data/wikipedia.annotated.csv",
               "ec4206572fcf7948d26b80e4210a0e5ea80fdec84a06afa7c4db3f9ded2f2b11"),
)
_BY_NAME = {source.name: source for source in SOURCES}

TEST_ROWS = 700
SEED = 2013


def source_url(source: SourceFile, base: str = "https://raw.githubusercontent.com") -> str:
    """Where the file's exact bytes can be downloaded: the raw file at the pinned commit."""
    return f"{base}/{source.repo}/{source.commit}/{source.path}"


def check_sha256(name: str, data: bytes) -> None:
    """Raise CompressError unless `data` has the pinned sha256 of source file `name`."""
    if name not in _BY_NAME:
        raise CompressError(f"unknown politeness source file '{name}'; expected one of: {', '.join(_BY_NAME)}")
    expected = _BY_NAME[name].sha256
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise CompressError(f"politeness source file {name} has sha256 {got}, expected {expected}; download it again "
                            f"from {source_url(_BY_NAME[name])}")


# ---- 1. read ----

def _read_csv(data: bytes) -> list[dict[str, str]]:
    # newline="" keeps the CRLF inside quoted Stack Exchange requests, which step 3 turns into LF
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")))


def _community_slug(community: str) -> str:
    # "092011 TeX - LaTeX" -> "tex-latex": drop the dump date (September 2011), keep the name in URL form
    name = re.sub(r"^\d{6} ", "", community)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ---- 2. label ----

def _label(rows: list[dict]) -> None:
    """Set each row's label from the quartiles of its own domain's scores (the paper labels each domain apart)."""
    for domain in dict.fromkeys(row["domain"] for row in rows):
        scores = [row["score"] for row in rows if row["domain"] == domain]
        q1, _, q3 = statistics.quantiles(scores, n=4, method="inclusive")
        for row in rows:
            if row["domain"] == domain:
                row["label"] = "polite" if row["score"] >= q3 else "impolite" if row["score"] <= q1 else None


# ---- 3. clean ----

# only well-formed entities (with the semicolon): bare `&` and URL query strings (`&action=history`) stay as written
_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]*|#[0-9]+|#[xX][0-9A-Fa-f]+);")
# an escape as the 2014 copy writes it, with its backslash
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")
# General Punctuation (dashes, quotes, ellipsis): every `u20xx` in the release was checked to be a lost escape
_PUNCTUATION = re.compile(r"u(20[0-6][0-9a-fA-F])")


def _restore_escapes(text: str, copy_2014: str) -> str:
    """Turn each backslash-less escape back into its character, where the 2014 copy shows that exact escape.

    The 2014 copy is lower-cased and HTML-escaped, so only its escapes are used: each is looked up in the release
    text after the previous one, in order, and a bare `xe9` that the copy does not show as `\\xe9` is left alone."""
    out, position = [], 0
    for escape in _ESCAPE.findall(copy_2014):
        found = re.compile(re.escape(escape), re.IGNORECASE | re.ASCII).search(text, position)
        if found is None:
            continue
        out += [text[position:found.start()], chr(int(escape[1:], 16))]
        position = found.end()
    return "".join(out) + text[position:]


def _clean_wikipedia(text: str, copy_2014: str) -> str:
    # one pass, so `&amp;Oslash;` becomes the literal `&Oslash;` the editor wrote about
    text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    text = _restore_escapes(text, copy_2014)
    return _PUNCTUATION.sub(lambda m: chr(int(m.group(1), 16)), text)


def _clean_stack_exchange(text: str) -> str:
    return text.replace("\r\n", "\n")


def _rows(sources: dict[str, bytes]) -> list[dict]:
    """All requests in file order (Wikipedia, then Stack Exchange), cleaned, with `label` still unset."""
    copy_2014 = {row["Id"]: row["Request"] for row in _read_csv(sources[WIKIPEDIA_2014])}
    rows = [{"id": f"wikipedia-{row['Id']}", "domain": "wikipedia",
             "text": _clean_wikipedia(row["Request"], copy_2014.get(row["Id"], "")),
             "score": float(row["Normalized Score"]), "label": None}
            for row in _read_csv(sources[WIKIPEDIA])]
    # Stack Exchange Ids are unique only within a community, hence the community in the id
    rows += [{"id": f"stack-exchange-{_community_slug(row['Community'])}-{row['Id']}", "domain": "stack-exchange",
              "text": _clean_stack_exchange(row["Request"]), "score": float(row["Normalized Score"]), "label": None}
             for row in _read_csv(sources[STACK_EXCHANGE])]
    return rows


# ---- 4. split ----

def _split(labelled: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, test): duplicate groups are kept whole, so no request text is in both files."""
    groups: dict[str, list[int]] = {}
    for index, row in enumerate(labelled):
        groups.setdefault("".join(row["text"].split()).casefold(), []).append(index)
    order = list(groups.values())  # first-appearance order, so the shuffle is reproducible
    random.Random(SEED).shuffle(order)
    test: set[int] = set()
    for group in order:
        if len(test) + len(group) <= TEST_ROWS:  # a group that would overshoot 700 is skipped, not split
            test.update(group)
        if len(test) == TEST_ROWS:
            break
    if len(test) != TEST_ROWS:
        raise CompressError(f"politeness split: the groups filled only {len(test)} of {TEST_ROWS} test rows")
    return ([row for i, row in enumerate(labelled) if i not in test],
            [row for i, row in enumerate(labelled) if i in test])


# ---- 5. serialise ----

def _jsonl(rows: list[dict]) -> bytes:
    # key order id, domain, text, score, label; default separators; the float's repr; raw UTF-8, not \u escapes
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def build_split(sources: dict[str, bytes]) -> dict[str, bytes]:
    """{source file name: raw bytes} for the three SOURCES -> {"train.jsonl": bytes, "test.jsonl": bytes}."""
    missing = [name for name in _BY_NAME if name not in sources]
    if missing:
        raise CompressError(f"politeness build is missing source file(s): {', '.join(missing)}")
    for name in _BY_NAME:
        check_sha256(name, sources[name])
    rows = _rows(sources)
    _label(rows)
    train, test = _split([row for row in rows if row["label"] is not None])
    return {"train.jsonl": _jsonl(train), "test.jsonl": _jsonl(test)}
