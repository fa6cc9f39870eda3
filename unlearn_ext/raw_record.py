"""Raw record first, page from it: the one shape of every benchmark harness (docs/results.md).

A harness measures into a JSON-able dict — its *raw record*: ``"harness"`` (the script that wrote it), the
command, the arguments and hyper-parameters used, every row as measured, machine facts, load averages, versions
and the git commit — writes it to ``<page stem>.json``, and renders its markdown page from what was written
alone, so ``--report <json>`` renders the same page again without measuring. A ``--report`` file that is not a
complete record of that harness is refused with one argparse error naming ``--report`` (exit 2) and nothing
written.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
from typing import Callable, Optional

from .results import write_text

#: What a renderer raises on a record that lacks what it reads.
INCOMPLETE = (KeyError, TypeError, ValueError, IndexError, AttributeError, statistics.StatisticsError)


def utc_minute() -> str:
    """Now, to the minute in UTC, as a page prints when it was measured."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}"


def json_beside(page: str) -> str:
    """The raw record's path for a page: the same stem, ``.json``."""
    return os.path.splitext(page)[0] + ".json"


def page_path(parser: argparse.ArgumentParser, out: Optional[str]) -> Optional[str]:
    """``--out`` names the page, which must end in .md (its raw record goes beside it)."""
    if out is not None and not out.endswith(".md"):
        parser.error(f"--out: {out!r} does not end in .md (the raw record goes beside it as .json)")
    return out


def write_then_page(record: dict, page: Optional[str], render: Callable[[dict], str]) -> str:
    """Write ``record`` beside ``page``, then the page rendered from what was written; returns the page (with
    ``page`` None nothing is written: the page is still rendered from the record as JSON gives it back)."""
    text = json.dumps(record, indent=1)
    if page is not None:
        write_text(text, json_beside(page))
    markdown = render(json.loads(text))
    if page is not None:
        write_text(markdown, page)
    return markdown


def read(parser: argparse.ArgumentParser, path: str, harness: str) -> dict:
    """The raw record at ``path`` written by ``harness``; any other file is an argparse error naming --report."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        parser.error(f"--report: cannot read {path!r} as JSON ({e})")
    if not isinstance(record, dict) or record.get("harness") != harness:
        parser.error(f"--report: {path!r} is not a raw record of {harness}")
    return record


def report(parser: argparse.ArgumentParser, path: str, harness: str, render: Callable[[dict], str],
           page: Optional[str] = None) -> str:
    """``--report path``: the page of the raw record at ``path`` (written by ``harness``), written to ``page``
    (default: beside the record); any other file is an argparse error naming --report, with nothing written."""
    record = read(parser, path, harness)
    try:
        markdown = render(record)
    except INCOMPLETE as e:
        parser.error(f"--report: {path!r} is not a complete raw record of {harness} ({e!r})")
    write_text(markdown, page or os.path.splitext(path)[0] + ".md")
    return markdown


__all__ = ["INCOMPLETE", "json_beside", "page_path", "read", "report", "utc_minute", "write_then_page"]
