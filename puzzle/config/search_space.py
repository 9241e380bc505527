"""Search spaces: which block variants each layer of the child may take (docs/method.md section 1).

A search space is a YAML file in `search_space/` (see `search_space/puzzle_paper.yaml`), parsed into a frozen
`SearchSpace` and enumerated against a `ParentShape` into concrete `BlockConfig`s per layer:

    space = SearchSpace.load("search_space/puzzle_paper.yaml")
    parent = ParentShape.from_config(AutoConfig.from_pretrained(path))
    variants = space.enumerate(parent)      # variants[i] = [parent block, ...] for layer i

YAML format (every key optional, unknown keys are errors):

    attention:
      kv_heads: [8, 4, 2, 1]   # GQA options as KV-head counts
      kv_heads_of: 8           # the counts are "out of 8" and are scaled to the parent's KV heads;
                               # omit it to read kv_heads as absolute counts for this parent
      linear: true             # replace_with_linear (one hidden x hidden matrix)
      no_op: true              # the residual passes through
    ffn:
      fractions: [1.0, 0.87, 0.75, 0.5, 0.25, 0.2, 0.1]   # of the parent's intermediate size, each in (0, 1]
      linear: true
      no_op: true
    ffn_multiple_of: 64        # round FFN widths to this multiple (default 1: exact, right for tiny models)
    layers:                    # per-layer overrides; negative indices count from the end
      0: {keep_parent: true}   # layer 0 keeps only the parent block
      -1:                      # a section given here replaces the global one for this layer;
        ffn: {fractions: [1.0, 0.5]}   # a section not given is inherited

Rules:
- The parent's own variant is always first in every list (it is added when the space omits it), so the
  all-parent model is always a candidate. A missing `attention` or `ffn` section means "parent only".
- Scaled KV heads (`kv_heads_of` given): each count must divide kv_heads_of; it becomes
  count * parent_kv / kv_heads_of, rounded down to a divisor of the parent's KV heads and at least 1, then
  deduplicated. The paper's 8/4/2/1 of 8 gives {8, 4, 2, 1} for an 8-KV-head parent and {2, 1} for a
  2-KV-head one.
- Absolute KV heads: each count must divide the parent's KV heads (hence its attention heads) and not exceed
  them; whole KV heads are mean-pooled in groups when the child is initialised, so groups must be even.
- FFN widths: fraction 1.0 is the parent's exact width; others are round(fraction * parent width) rounded to
  the nearest multiple of `ffn_multiple_of` (at least one multiple, at most the parent width), deduplicated.
- Duplicates written in the YAML itself (`kv_heads: [4, 4]`) are errors; duplicates produced by scaling or
  rounding are merged silently, because they are expected on small parents.
- A job's `target.engines` (`job_search_space`) leaves out every variant, and every (attention, FFN) pair, that one
  of those serving engines cannot serve (puzzle.hf.engines; docs/engines.md); an engine that cannot serve the
  parent's own block is an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from puzzle.errors import ConfigError
from puzzle.hf.engines import (
    attention_problem,
    engines_named,
    ffn_problem,
    servable_attention,
    servable_block,
    servable_ffn,
    shape_problem,
)
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig

_ATTENTION_KEYS = {"kv_heads", "kv_heads_of", "linear", "no_op"}
_FFN_KEYS = {"fractions", "linear", "no_op"}
_TOP_KEYS = {"attention", "ffn", "ffn_multiple_of", "layers", "description"}
_LAYER_KEYS = {"keep_parent", "attention", "ffn"}


@dataclass(frozen=True)
class ParentShape:
    """The dimensions of a Llama-family parent that a search space is enumerated against."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int | None = None
    """Per-head width when the config gives one (it may differ from hidden_size / num_attention_heads)."""

    def __post_init__(self) -> None:
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parent {name}={getattr(self, name)} must be >= 1")
        if self.intermediate_size < 1:
            raise ConfigError(f"parent intermediate_size={self.intermediate_size} must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"parent num_key_value_heads={self.num_key_value_heads} does not divide "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> ParentShape:
        """Read the shape from an HF config object (or a dict with the same keys).

        `num_key_value_heads` missing or None means multi-head attention, as in transformers' Llama.
        """

        def get(key: str) -> Any:
            return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)

        missing = [
            k
            for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
            if get(k) is None
        ]
        if missing:
            raise ConfigError(f"parent config lacks {', '.join(missing)}; puzzle needs a Llama-family config")
        heads = int(get("num_attention_heads"))
        kv = get("num_key_value_heads")
        return cls(
            num_hidden_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            num_attention_heads=heads,
            num_key_value_heads=int(kv) if kv is not None else heads,
            intermediate_size=int(get("intermediate_size")),
            head_dim=int(get("head_dim")) if get("head_dim") is not None else None,
        )

    @property
    def parent_attention(self) -> AttentionConfig:
        return AttentionConfig(n_heads_in_group=self.num_attention_heads // self.num_key_value_heads)

    @property
    def parent_ffn(self) -> FFNConfig:
        return FFNConfig(intermediate_size=self.intermediate_size)

    @property
    def parent_block(self) -> BlockConfig:
        return BlockConfig(attention=self.parent_attention, ffn=self.parent_ffn)


@dataclass(frozen=True)
class AttentionSpace:
    """Attention options of one layer (or of all layers): GQA KV-head counts, linear, no-op."""

    kv_heads: tuple[int, ...] = ()
    kv_heads_of: int | None = None
    linear: bool = False
    no_op: bool = False
    path: str = "attention"
    """Where this section came from in the YAML, for error messages."""

    def kv_head_counts(self, parent: ParentShape, source: str) -> list[int]:
        """The concrete KV-head counts for `parent` (without the parent's own), validated, in YAML order."""
        counts: list[int] = []
        for i, count in enumerate(self.kv_heads):
            where = f"search space {source}: {self.path}.kv_heads[{i}]={count}"
            if self.kv_heads_of is not None:
                if count > self.kv_heads_of:
                    raise ConfigError(f"{where} exceeds kv_heads_of={self.kv_heads_of}")
                if self.kv_heads_of % count:
                    raise ConfigError(f"{where} does not divide kv_heads_of={self.kv_heads_of}")
                counts.append(_scale_kv_heads(count, self.kv_heads_of, parent.num_key_value_heads))
                continue
            if parent.num_attention_heads % count:
                raise ConfigError(f"{where} does not divide the parent's {parent.num_attention_heads} attention heads")
            if count > parent.num_key_value_heads:
                raise ConfigError(
                    f"{where} exceeds the parent's {parent.num_key_value_heads} KV heads; "
                    "use kv_heads_of to scale counts to the parent"
                )
            if parent.num_key_value_heads % count:
                raise ConfigError(
                    f"{where} does not divide the parent's {parent.num_key_value_heads} KV heads "
                    "(child KV heads are mean-pooled from whole groups of parent KV heads)"
                )
            counts.append(count)
        return counts

    def variants(self, parent: ParentShape, source: str) -> list[AttentionConfig]:
        out = [parent.parent_attention]
        out += [
            AttentionConfig(n_heads_in_group=parent.num_attention_heads // c)
            for c in self.kv_head_counts(parent, source)
        ]
        if self.linear:
            out.append(AttentionConfig(replace_with_linear=True))
        if self.no_op:
            out.append(AttentionConfig(no_op=True))
        return _dedupe(out)


@dataclass(frozen=True)
class FFNSpace:
    """FFN options of one layer (or of all layers): fractions of the parent's width, linear, no-op."""

    fractions: tuple[float, ...] = ()
    linear: bool = False
    no_op: bool = False
    path: str = "ffn"
    """Where this section came from in the YAML, for error messages."""

    def variants(self, parent: ParentShape, multiple_of: int) -> list[FFNConfig]:
        out = [parent.parent_ffn]
        out += [
            FFNConfig(intermediate_size=ffn_width(f, parent.intermediate_size, multiple_of)) for f in self.fractions
        ]
        if self.linear:
            out.append(FFNConfig(replace_with_linear=True))
        if self.no_op:
            out.append(FFNConfig(no_op=True))
        return _dedupe(out)


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer options: `keep_parent`, or sections that replace the global ones for this layer."""

    keep_parent: bool = False
    attention: AttentionSpace | None = None
    ffn: FFNSpace | None = None


@dataclass(frozen=True)
class SearchSpace:
    """Per-layer block options, parsed from YAML; enumerate it against a `ParentShape`."""

    attention: AttentionSpace = field(default_factory=AttentionSpace)
    ffn: FFNSpace = field(default_factory=FFNSpace)
    ffn_multiple_of: int = 1
    """FFN widths are rounded to a multiple of this (8 or 64 suit GPUs; 1 keeps tiny models exact)."""
    layers: tuple[tuple[int, LayerOverride], ...] = ()
    """(layer index as written, possibly negative; override), in YAML order."""
    source: str = "<dict>"
    """The file (or label) this space came from, for error messages."""
    description: str = ""
    engines: tuple[str, ...] = ()
    """Serving engines every child must load in (`target.engines`): variants one of them cannot serve are left out
    (puzzle.hf.engines). Empty: no restriction."""

    @classmethod
    def load(cls, path: str | Path) -> SearchSpace:
        """Parse a search-space YAML file; a missing, unreadable or malformed file raises ConfigError."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"search space {path}: cannot read it ({err.strerror or err})") from err
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"search space {path}: invalid YAML ({str(err).splitlines()[0]})") from err
        return cls.from_dict(data, source=path.name)

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>") -> SearchSpace:
        """Parse the YAML's content; structural errors (types, ranges, duplicates, unknown keys) raise here."""
        d = _mapping(d, source, "the top level")
        _check_keys(d, _TOP_KEYS, source, "")
        attention_raw = _mapping(d.get("attention", {}), source, "attention")
        ffn_raw = _mapping(d.get("ffn", {}), source, "ffn")
        multiple_of = d.get("ffn_multiple_of", 1)
        if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
            raise ConfigError(f"search space {source}: ffn_multiple_of={multiple_of!r} must be an integer >= 1")
        description = d.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"search space {source}: description must be a string")
        return cls(
            attention=_parse_attention(attention_raw, source, "attention"),
            ffn=_parse_ffn(ffn_raw, source, "ffn"),
            ffn_multiple_of=multiple_of,
            layers=_parse_layers(d.get("layers", {}), source),
            source=source,
            description=description,
        )

    def _override(self, parent: ParentShape, layer_idx: int) -> LayerOverride | None:
        n = parent.num_hidden_layers
        if not -n <= layer_idx < n:
            raise ConfigError(f"layer index {layer_idx} is out of range for a parent with {n} layers")
        found = None
        for idx, override in self.layers:
            if idx % n == layer_idx % n:
                found = override
        return found

    def attention_variants(self, parent: ParentShape, layer_idx: int) -> list[AttentionConfig]:
        """Attention options of layer `layer_idx`, the parent's first."""
        override = self._override(parent, layer_idx)
        if override is not None and override.keep_parent:
            return [parent.parent_attention]
        section = override.attention if override is not None and override.attention is not None else self.attention
        engines = engines_named(self.engines)
        return [a for a in section.variants(parent, self.source) if servable_attention(a, engines)]

    def ffn_variants(self, parent: ParentShape, layer_idx: int) -> list[FFNConfig]:
        """FFN options of layer `layer_idx`, the parent's first."""
        override = self._override(parent, layer_idx)
        if override is not None and override.keep_parent:
            return [parent.parent_ffn]
        section = override.ffn if override is not None and override.ffn is not None else self.ffn
        engines = engines_named(self.engines)
        variants = section.variants(parent, self.ffn_multiple_of)
        return [f for f in variants if servable_ffn(f, engines, parent.hidden_size)]

    def block_variants(self, parent: ParentShape, layer_idx: int) -> list[BlockConfig]:
        """Every (attention, FFN) pair of layer `layer_idx`; the parent block is first."""
        engines = engines_named(self.engines)
        last = layer_idx % parent.num_hidden_layers == parent.num_hidden_layers - 1
        pairs = itertools.product(self.attention_variants(parent, layer_idx), self.ffn_variants(parent, layer_idx))
        blocks = [BlockConfig(attention=a, ffn=f) for a, f in pairs]
        return [b for b in blocks if servable_block(b, engines, last)]

    def enumerate(self, parent: ParentShape) -> list[list[BlockConfig]]:
        """Block variants of every layer of `parent` (validates the space first)."""
        self.validate(parent)
        return [self.block_variants(parent, i) for i in range(parent.num_hidden_layers)]

    def validate(self, parent: ParentShape) -> None:
        """Raise ConfigError naming the first entry that does not fit `parent`."""
        n = parent.num_hidden_layers
        seen: dict[int, int] = {}
        for idx, _ in self.layers:
            if not -n <= idx < n:
                raise ConfigError(
                    f"search space {self.source}: layers.{idx} is out of range for a parent with {n} layers "
                    f"(valid: {-n}..{n - 1})"
                )
            if idx % n in seen:
                raise ConfigError(
                    f"search space {self.source}: layers.{idx} and layers.{seen[idx % n]} are the same layer "
                    f"of a {n}-layer parent"
                )
            seen[idx % n] = idx
        self.attention.kv_head_counts(parent, self.source)
        for _, override in self.layers:
            if override.attention is not None:
                override.attention.kv_head_counts(parent, self.source)
        self._check_parent_servable(parent)

    def _check_parent_servable(self, parent: ParentShape) -> None:
        """The parent's own block is every layer's first variant (the all-parent model is always a candidate), so a
        target engine that cannot serve it leaves a layer kept as the parent with nothing servable."""
        for engine in engines_named(self.engines):
            problem = (
                shape_problem(parent.hidden_size, parent.num_attention_heads, parent.head_dim, engine)
                or attention_problem(parent.parent_attention, engine)
                or ffn_problem(parent.parent_ffn, engine, parent.hidden_size)
            )
            if problem:
                raise ConfigError(
                    f"target.engines: {engine.label} cannot serve the parent's own block ({problem}, hidden "
                    f"{parent.hidden_size}), which every layer may keep; remove {engine.name} from target.engines"
                )

    def removed_by_engines(self, parent: ParentShape) -> list[str]:
        """What `engines` leaves out, over all layers, for a log line: subblock variant names, and (attention, FFN)
        pairs as "attn_x+ffn_y" where only the pair is unservable."""
        unrestricted = dataclasses.replace(self, engines=())
        removed: list[str] = []
        for i in range(parent.num_hidden_layers):
            kept_subblocks = {*self.attention_variants(parent, i), *self.ffn_variants(parent, i)}
            kept = set(self.block_variants(parent, i))
            for block in unrestricted.block_variants(parent, i):
                gone = [sub.name for sub in (block.attention, block.ffn) if sub not in kept_subblocks]
                if not gone and block not in kept:
                    gone = [f"{block.attention.name}+{block.ffn.name}"]
                removed += [name for name in gone if name not in removed]
        return removed

    def num_candidates(self, parent: ParentShape) -> int:
        """The number of distinct child architectures: the product of per-layer variant counts."""
        return math.prod(len(v) for v in self.enumerate(parent))


def job_search_space(job: Any) -> SearchSpace:
    """A job's search space: its `search_space.path` file, restricted to the job's `target.engines`."""
    from puzzle.config.paths import resolve_path

    return dataclasses.replace(SearchSpace.load(resolve_path(job.search_space.path)), engines=tuple(job.target.engines))


def ffn_width(fraction: float, parent_width: int, multiple_of: int = 1) -> int:
    """The FFN width for `fraction` of `parent_width`, rounded to a multiple of `multiple_of` (see module doc)."""
    if fraction >= 1.0:
        return parent_width
    width = round(fraction * parent_width / multiple_of) * multiple_of
    return min(max(width, multiple_of, 1), parent_width)


def _scale_kv_heads(count: int, of: int, parent_kv: int) -> int:
    """count/of of the parent's KV heads, rounded down to a divisor of parent_kv, at least 1."""
    target = count * parent_kv / of
    return max([d for d in range(1, parent_kv + 1) if parent_kv % d == 0 and d <= target] or [1])


def _dedupe(items: list) -> list:
    return list(dict.fromkeys(items))


def _mapping(value: Any, source: str, where: str) -> dict:
    if not isinstance(value, Mapping):
        got = "empty" if value is None else type(value).__name__
        raise ConfigError(f"search space {source}: {where} must be a mapping, got {got}")
    return dict(value)


def _check_keys(d: Mapping, known: set[str], source: str, path: str) -> None:
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(
            f"search space {source}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(known))})"
        )


def _bool(d: Mapping, key: str, source: str, path: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"search space {source}: {path}.{key}={value!r} must be true or false")
    return value


def _option_list(d: Mapping, key: str, source: str, path: str) -> list:
    value = d.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"search space {source}: {path}.{key} must be a list, got {type(value).__name__}")
    if key in d and not value:
        raise ConfigError(
            f"search space {source}: {path}.{key} is empty; list at least one option or remove the key "
            "(the parent's own variant is always included)"
        )
    for i, item in enumerate(value):
        if item in value[:i]:
            raise ConfigError(
                f"search space {source}: {path}.{key}[{i}]={item} duplicates {path}.{key}[{value.index(item)}]"
            )
    return value


def _parse_attention(d: dict, source: str, path: str) -> AttentionSpace:
    _check_keys(d, _ATTENTION_KEYS, source, path)
    counts = _option_list(d, "kv_heads", source, path)
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"search space {source}: {path}.kv_heads[{i}]={c!r} must be an integer >= 1")
    of = d.get("kv_heads_of")
    if of is not None and (isinstance(of, bool) or not isinstance(of, int) or of < 1):
        raise ConfigError(f"search space {source}: {path}.kv_heads_of={of!r} must be an integer >= 1")
    return AttentionSpace(
        kv_heads=tuple(counts),
        kv_heads_of=of,
        linear=_bool(d, "linear", source, path),
        no_op=_bool(d, "no_op", source, path),
        path=path,
    )


def _parse_ffn(d: dict, source: str, path: str) -> FFNSpace:
    _check_keys(d, _FFN_KEYS, source, path)
    fractions = _option_list(d, "fractions", source, path)
    for i, f in enumerate(fractions):
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f <= 1:
            raise ConfigError(
                f"search space {source}: {path}.fractions[{i}]={f!r} is outside (0, 1]; "
                "write fractions of the parent's intermediate size, e.g. 0.5 for 50%"
            )
    return FFNSpace(
        fractions=tuple(float(f) for f in fractions),
        linear=_bool(d, "linear", source, path),
        no_op=_bool(d, "no_op", source, path),
        path=path,
    )


def _parse_layers(raw: Any, source: str) -> tuple[tuple[int, LayerOverride], ...]:
    raw = _mapping(raw if raw is not None else {}, source, "layers")
    out: list[tuple[int, LayerOverride]] = []
    for key, value in raw.items():
        try:
            idx = int(key) if not isinstance(key, bool) else None
        except (TypeError, ValueError):
            idx = None
        if idx is None or (isinstance(key, float) and key != idx):
            raise ConfigError(f"search space {source}: layers key {key!r} is not a layer index (an integer)")
        path = f"layers.{idx}"
        d = _mapping(value, source, path)
        _check_keys(d, _LAYER_KEYS, source, path)
        keep = _bool(d, "keep_parent", source, path)
        if keep and ("attention" in d or "ffn" in d):
            raise ConfigError(f"search space {source}: {path} has keep_parent with attention/ffn; use one or the other")
        attention = (
            _parse_attention(_mapping(d["attention"], source, f"{path}.attention"), source, f"{path}.attention")
            if "attention" in d
            else None
        )
        ffn = _parse_ffn(_mapping(d["ffn"], source, f"{path}.ffn"), source, f"{path}.ffn") if "ffn" in d else None
        out.append((idx, LayerOverride(keep_parent=keep, attention=attention, ffn=ffn)))
    return tuple(out)
