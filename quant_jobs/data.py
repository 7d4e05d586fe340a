"""Calibration and evaluation text: dataset names, local files, token windows.

Calibration never reads an evaluation split: the names map to WikiText-2 *train* and C4 samples shipped with
the package, and perplexity reads WikiText-2 *test* from a separate file.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator, List, Optional

import torch

log = logging.getLogger(__name__)

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
NAMED = {"wikitext2": PACKAGE_DATA / "wikitext2_train_first1MB.txt", "c4": PACKAGE_DATA / "c4_sample_1480.jsonl"}
DATASET_NAMES = ("wikitext2", "c4", "pileval")
EVAL_CANDIDATES = ("wikitext2/wiki.test.raw",)


def check_dataset(name: str) -> None:
    """Fail early (before any model loads) on a dataset that is neither a known name nor a readable file."""
    if name in DATASET_NAMES:
        return
    p = Path(name).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"calib_dataset: {name!r} is neither a dataset name {list(DATASET_NAMES)} nor a file")
    if p.suffix not in (".txt", ".raw", ".jsonl", ".json", ".parquet"):
        raise ValueError(f"calib_dataset: {p.name}: unsupported file type {p.suffix!r}; use .txt, .jsonl or .parquet")


def _pileval_texts() -> Optional[Iterator[str]]:
    try:
        import datasets
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        ds = datasets.load_dataset("mit-han-lab/pile-val-backup", split="validation")
        return (row["text"] for row in ds)
    except Exception as e:  # not in the local cache: there is no download here
        log.warning("pileval is not in the local datasets cache (%s); using the shipped C4 sample instead",
                    type(e).__name__)
        return None


def iter_texts(name: str) -> Iterator[str]:
    """Documents of a named dataset or a local file (.txt/.raw: the whole file; .jsonl/.parquet: "text")."""
    check_dataset(name)
    if name == "pileval":
        texts = _pileval_texts()
        if texts is not None:
            yield from texts
            return
        name = "c4"
    path = NAMED.get(name) or Path(name).expanduser()
    if path.suffix in (".txt", ".raw"):
        yield path.read_text(encoding="utf-8")
    elif path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    if "text" not in row:
                        raise ValueError(f"calib_dataset: {path.name} line {i + 1} has no \"text\" field")
                    yield row["text"]
    else:
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ValueError(f"calib_dataset: {path.name} has no \"text\" column (columns: {table.column_names})")
        yield from table.column("text").to_pylist()


def calib_windows(tokenizer, name: str, samples: int, seqlen: int) -> torch.Tensor:
    """[samples, seqlen] token ids: the documents joined by blank lines, cut into consecutive windows."""
    need = samples * seqlen
    ids: List[int] = []
    for doc in iter_texts(name):
        if doc.strip():
            ids.extend(tokenizer(doc + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    have = len(ids) // seqlen
    if have == 0:
        raise ValueError(f"calib_dataset: {name!r} yields no sample of {seqlen} tokens ({len(ids)} tokens in all)")
    if have < samples:
        raise ValueError(f"calib_samples: {name!r} holds only {have} windows of {seqlen} tokens; "
                         f"ask for at most {have} samples or a shorter calib_seqlen")
    return torch.tensor(ids[:need], dtype=torch.long).view(samples, seqlen)


def find_eval_file(explicit: Optional[str] = None) -> Path:
    """WikiText-2 raw test: --eval-file, $RAYLM_DATA, or the shared data folder beside the repository."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"eval_file: no such file: {p}")
        return p
    roots = [os.environ.get("RAYLM_DATA"), Path(__file__).resolve().parent.parent.parent / "shared" / "data"]
    for root in filter(None, roots):
        for rel in EVAL_CANDIDATES:
            if (Path(root) / rel).is_file():
                return Path(root) / rel
    raise FileNotFoundError("eval_file: WikiText-2 test (wiki.test.raw) not found; pass --eval-file or set "
                            "RAYLM_DATA to a folder holding wikitext2/wiki.test.raw")


def wikitext2_test_text(path: Path) -> str:
    """The standard protocol: lines keep their newline, whitespace-only lines become empty rows, joined by
    blank lines (equals the Hugging Face test split's `text` column joined with "\\n\\n")."""
    with open(path, encoding="utf-8") as f:
        rows = ["" if not line.strip() else line for line in f]
    return "\n\n".join(rows)
