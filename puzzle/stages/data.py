"""Corpora, document-level splits and packed token sequences for every stage that reads text.

A corpus is a list of `Document`s from one source: the `*.py` files of the running Python's standard
library (the embedded default, real text every Python installation carries), local text files by glob,
jsonl records with a text field, or a Hugging Face `datasets` name or path (offline on local files).
Documents are split by a hash of their id, never by token position, into:

    calibration   initialising child blocks from the parent (activation statistics)
    train         the parent's tokenizer and weights, BLD and GKD
    validation    replace-one-block scoring
    test          final evaluation of parent and child

`build_splits` tokenises each split with `datasets.map` (cached on disk by a fingerprint of the text,
the tokenizer and the sequence length) and packs it into fixed-length sequences; `batches` turns a
packed split into `[batch, seq_len]` LongTensors.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from puzzle.config.schema import SPLITS, DataConfig
from puzzle.errors import ConfigError, PuzzleError
from puzzle.runner.stage import StageContext, StageResult, write_json

# Directory names left out of the stdlib corpus: tests are unusual code (huge literal tables, deliberately
# broken encodings) and would double the tokenising cost for no gain; site-packages is not the stdlib.
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
# Bumped when the packing format changes, so old cache files are never reused.
_PACK_FORMAT = 1


@dataclass(frozen=True)
class Document:
    """One unit of splitting: a file, a jsonl record or a dataset row."""

    id: str
    """Stable identifier (relative path, `path:line`, `dataset:index`); its hash decides the split."""
    text: str


# ----------------------------------------------------------------------------------------------- corpora


def load_documents(cfg: DataConfig) -> list[Document]:
    """Read the corpus `cfg` names; empty documents are dropped, at most `cfg.max_documents` are kept."""
    loaders = {"stdlib": _stdlib_documents, "files": _file_documents, "jsonl": _jsonl_documents, "hf": _hf_documents}
    docs = [doc for doc in loaders[cfg.source](cfg) if doc.text.strip()]
    if not docs:
        raise PuzzleError(f"the {_describe(cfg)} corpus has no non-empty documents; point data.paths at some text")
    ids = [doc.id for doc in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PuzzleError(f"document id {dup!r} appears twice in the {_describe(cfg)} corpus; remove the duplicate")
    if cfg.max_documents is not None and len(docs) > cfg.max_documents:
        docs = sorted(docs, key=lambda d: _doc_hash(d.id, cfg.seed))[: cfg.max_documents]
        docs.sort(key=lambda d: d.id)
    return docs


def stdlib_root() -> Path:
    """Directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents(cfg: DataConfig) -> list[Document]:
    root = stdlib_root()
    paths = sorted(p for p in root.rglob("*.py") if not _STDLIB_EXCLUDED_DIRS.intersection(p.relative_to(root).parts))
    return _read_files([(p.relative_to(root).as_posix(), p) for p in paths if p.is_file()], cfg)


def _read_files(named: list[tuple[str, Path]], cfg: DataConfig) -> list[Document]:
    if cfg.max_documents is None:
        return [Document(doc_id, _read_text(path)) for doc_id, path in named]
    # Read only the files the cap keeps (the first non-empty ones in hash order, as load_documents picks).
    docs = []
    for doc_id, path in sorted(named, key=lambda item: _doc_hash(item[0], cfg.seed)):
        text = _read_text(path)
        if text.strip():
            docs.append(Document(doc_id, text))
            if len(docs) == cfg.max_documents:
                break
    return sorted(docs, key=lambda d: d.id)


def _expand_globs(patterns: str | Sequence[str]) -> list[Path]:
    if isinstance(patterns, str):
        patterns = [patterns]
    found: dict[str, Path] = {}
    for pattern in patterns:
        matches = [m for m in glob.glob(os.path.expanduser(str(pattern)), recursive=True) if os.path.isfile(m)]
        if not matches:
            raise ConfigError(f"data.paths glob {pattern!r} matches no files; check the path (`**` recurses)")
        for match in matches:
            found.setdefault(os.path.normpath(match), Path(match))
    return [found[key] for key in sorted(found)]


def _file_documents(cfg: DataConfig) -> list[Document]:
    return _read_files([(os.path.normpath(p), p) for p in _expand_globs(cfg.paths)], cfg)


def _jsonl_documents(cfg: DataConfig) -> list[Document]:
    docs = []
    for path in _expand_globs(cfg.paths):
        with open(path, encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PuzzleError(f"{where} is not valid JSON ({err.msg}); fix or remove that line") from None
                if not isinstance(record, dict):
                    raise PuzzleError(f"{where} holds a {type(record).__name__}, not a JSON object with a text field")
                docs.append(Document(where, _text_of(record, cfg.text_field, where)))
    return docs


def _hf_documents(cfg: DataConfig) -> list[Document]:
    import datasets

    data_files = cfg.paths
    if isinstance(data_files, str):
        data_files = [os.path.expanduser(data_files)]
    saved = Path(os.path.expanduser(cfg.hf_path))
    try:
        if (saved / "state.json").is_file() or (saved / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(saved))  # a directory written by Dataset(Dict).save_to_disk
            ds = ds[cfg.hf_split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=cfg.hf_split, data_files=data_files)
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PuzzleError(f"cannot load dataset data.hf_path={cfg.hf_path!r} split={cfg.hf_split!r}: {first}") from None
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            f"text field {cfg.text_field!r} not in dataset {cfg.hf_path!r}; its fields are {ds.column_names} "
            "(set data.text_field)"
        )
    prefix = f"{cfg.hf_path}/{cfg.hf_name or 'default'}/{cfg.hf_split}"
    texts = ds[cfg.text_field]
    return [Document(f"{prefix}:{i}", text if isinstance(text, str) else "") for i, text in enumerate(texts)]


def _text_of(record: dict[str, Any], field: str, where: str) -> str:
    if field not in record:
        raise ConfigError(
            f"text field {field!r} missing at {where}; fields present: {sorted(record)} (set data.text_field)"
        )
    text = record[field]
    if not isinstance(text, str):
        raise PuzzleError(f"text field {field!r} at {where} is a {type(text).__name__}, not a string")
    return text


def _read_text(path: Path) -> str:
    # errors="replace": one odd byte in a source file should not stop a whole job.
    return Path(path).read_text(encoding="utf-8", errors="replace")


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "stdlib":
        return f"standard library ({stdlib_root()})"
    if cfg.source == "hf":
        return f"hf dataset {cfg.hf_path!r}"
    return f"{cfg.source} {cfg.paths!r}"


# ----------------------------------------------------------------------------------------------- splits


def _doc_hash(doc_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{doc_id}".encode()).hexdigest()


def split_documents(docs: Sequence[Document], cfg: DataConfig) -> dict[str, list[Document]]:
    """Assign each document to exactly one split, by the rank of its seeded id hash.

    Ranks (not hash thresholds) make every split with a positive fraction non-empty on small corpora;
    the result depends only on the set of ids and the seed, never on order or token positions.
    """
    fractions = cfg.fractions()
    wanted = [name for name in SPLITS if fractions[name] > 0]
    if len(docs) < len(wanted):
        raise PuzzleError(
            f"the corpus has {len(docs)} documents but {len(wanted)} splits ({', '.join(wanted)}) need one each; "
            "add documents or set some split fractions to 0"
        )
    ranked = sorted(docs, key=lambda d: _doc_hash(d.id, cfg.seed))
    counts = {name: max(1, round(fractions[name] * len(docs))) if fractions[name] > 0 else 0 for name in SPLITS}
    counts["train"] = len(docs) - sum(counts[name] for name in SPLITS if name != "train")
    if counts["train"] < 1:
        raise PuzzleError(f"{len(docs)} documents leave none for training after {counts}; add documents")
    out, start = {}, 0
    for name in SPLITS:
        out[name] = ranked[start : start + counts[name]]
        start += counts[name]
    return out


# ----------------------------------------------------------------------------------------------- tokens


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A content hash of a tokenizer: same vocabulary, merges and special tokens -> same fingerprint."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:  # a slow (pure-Python) tokenizer: let datasets hash the object
        from datasets.fingerprint import Hasher

        payload = Hasher.hash(tokenizer)
    extra = f"{len(tokenizer)}|{_separator_id(tokenizer)}"
    return hashlib.sha256(f"{payload}|{extra}".encode()).hexdigest()[:20]


def _separator_id(tokenizer: Any) -> int | None:
    """Token placed between packed documents: EOS, else BOS, else nothing."""
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def check_compatibility(
    cfg: DataConfig, tokenizer: Any, max_positions: int | None = None, vocab_size: int | None = None
) -> None:
    """Fail clearly when the data cannot feed the parent: sequences too long or a foreign tokenizer."""
    if max_positions is not None and cfg.seq_len > max_positions:
        raise ConfigError(
            f"data.seq_len={cfg.seq_len} exceeds the parent's max_position_embeddings={max_positions}; "
            f"set data.seq_len <= {max_positions}"
        )
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the parent's vocab_size is {vocab_size}; "
            "use the tokenizer saved with the parent checkpoint"
        )


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        base = os.environ.get("HF_DATASETS_CACHE")
        if base is None:
            import datasets

            base = datasets.config.HF_DATASETS_CACHE
        cache_dir = Path(base) / "puzzle_packed"
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _text_hash(docs: Sequence[Document]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.id.encode())
        digest.update(b"\0")
        digest.update(doc.text.encode("utf-8", errors="replace"))
        digest.update(b"\1")
    return digest.hexdigest()[:20]


def tokenize_documents(
    docs: Sequence[Document], tokenizer: Any, cache_dir: Path, *, num_proc: int | None = None, name: str = "docs"
):
    """Tokenise documents (separator appended) with a cached batched `datasets.map`.

    Returns a Dataset with columns "input_ids" (one list per document) and "n_tokens".
    """
    import datasets

    sep = _separator_id(tokenizer)
    key = hashlib.sha256(f"{_PACK_FORMAT}|{tokenizer_fingerprint(tokenizer)}|{_text_hash(docs)}".encode()).hexdigest()

    def encode(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if sep is not None:
            ids = [row + [sep] for row in ids]
        return {"input_ids": ids, "n_tokens": [len(row) for row in ids]}

    source = datasets.Dataset.from_dict({"id": [d.id for d in docs], "text": [d.text for d in docs]})
    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "n_tokens": datasets.Value("int64")}
    )
    return source.map(
        encode,
        batched=True,
        remove_columns=["id", "text"],
        features=features,
        num_proc=num_proc if num_proc and len(docs) > 1 else None,
        cache_file_name=str(cache_dir / f"{name}-tok-{key[:24]}.arrow"),
        new_fingerprint=key[:32],
        desc=f"tokenising {name}",
    )


def pack_tokens(tokenized, seq_len: int, cache_dir: Path, *, name: str = "docs"):
    """Concatenate tokenised documents and cut them into rows of exactly `seq_len` tokens (cached).

    Packing works per batch of 1,000 documents, so each batch drops its last partial row (< seq_len tokens).
    """
    import datasets

    key = hashlib.sha256(f"{tokenized._fingerprint}|pack|{seq_len}".encode()).hexdigest()

    def pack(batch: dict[str, list]) -> dict[str, list]:
        flat = np.fromiter((t for row in batch["input_ids"] for t in row), dtype=np.int32)
        rows = len(flat) // seq_len
        return {"input_ids": flat[: rows * seq_len].reshape(rows, seq_len).tolist()}

    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=seq_len)})
    return tokenized.map(
        pack,
        batched=True,
        batch_size=1000,
        remove_columns=tokenized.column_names,
        features=features,
        cache_file_name=str(cache_dir / f"{name}-pack{seq_len}-{key[:24]}.arrow"),
        new_fingerprint=key[:32],
        desc=f"packing {name}",
    )


def build_splits(
    cfg: DataConfig,
    tokenizer: Any,
    max_positions: int | None = None,
    vocab_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Load, split, tokenise and pack the corpus: split name -> Dataset of fixed-length "input_ids" rows.

    `max_positions` / `vocab_size` are the parent's, checked against `cfg.seq_len` and the tokenizer. A split
    with a positive fraction that yields no full sequence is an error; a split with fraction 0 is empty.
    """
    check_compatibility(cfg, tokenizer, max_positions, vocab_size)
    parts = split_documents(load_documents(cfg), cfg)
    root = _cache_root(cache_dir)
    tokenized = {
        name: tokenize_documents(docs, tokenizer, root, num_proc=cfg.num_proc, name=name)
        for name, docs in parts.items()
    }
    tokens = {name: int(sum(ds["n_tokens"])) if len(ds) else 0 for name, ds in tokenized.items()}
    if sum(tokens.values()) == 0:
        raise PuzzleError(f"the {_describe(cfg)} corpus tokenises to no tokens; check the text and the tokenizer")
    out = {}
    for name, ds in tokenized.items():
        out[name] = pack_tokens(ds, cfg.seq_len, root, name=name)
        if len(out[name]) == 0 and parts[name]:
            raise PuzzleError(
                f"split {name!r} ({len(parts[name])} documents, {tokens[name]} tokens) yields no sequence of "
                f"data.seq_len={cfg.seq_len} tokens; lower data.seq_len or raise data.{name}_fraction"
            )
    return out


def split_tokens(dataset: Any) -> int:
    """Number of tokens in a packed split."""
    return len(dataset) * len(dataset[0]["input_ids"]) if len(dataset) else 0


def batches(
    dataset: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0, max_tokens: int | None = None
) -> Iterator[torch.LongTensor]:
    """One pass over a packed split as `[batch, seq_len]` LongTensors (the last batch may be smaller).

    With `max_tokens`, stops once that many tokens were yielded (whole rows: at most one row past it).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    n = len(dataset)
    if max_tokens is not None and n:
        n = min(n, math.ceil(max_tokens / len(dataset[0]["input_ids"])))
    order = np.random.default_rng(seed).permutation(len(dataset))[:n] if shuffle else None
    rows = dataset.with_format("numpy")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        # Contiguous slices read the arrow table without a gather; shuffled batches gather by index.
        chunk = rows[start:stop] if order is None else rows[order[start:stop].tolist()]
        yield torch.from_numpy(np.asarray(chunk["input_ids"], dtype=np.int64))


# ------------------------------------------------------------------------------------------- stage adapter


def run(ctx: StageContext) -> StageResult:
    """Tokenise, split and pack the corpus with the parent's tokenizer; save each split with save_to_disk."""
    from transformers import AutoTokenizer

    info = ctx.parent_info()
    tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=ctx.job.parent.trust_remote_code)
    splits = build_splits(ctx.job.data, tokenizer, info.get("max_position_embeddings"), info.get("vocab_size"))
    counts = {}
    for name, dataset in splits.items():
        dataset.save_to_disk(str(ctx.out_dir / name))
        counts[name] = {"sequences": len(dataset), "tokens": split_tokens(dataset)}
    write_json(ctx.out_dir / "splits.json", counts)
    return StageResult(tokens=sum(c["tokens"] for c in counts.values()), summary={"splits": counts})


def load_split(ctx: StageContext, split: str) -> Any:
    """A packed split ("calibration", "train", "validation", "test") saved by the data stage."""
    import datasets

    return datasets.load_from_disk(str(ctx.upstream["data"] / split))
