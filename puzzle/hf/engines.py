"""What each serving engine can load from a puzzle export, and a check of an export against it.

Every engine reads the DeciLM / nemotron-nas `block_configs` of an export (`puzzle.hf.export`) with its own subset of
fields and its own gaps, found by reading each engine's model file (docs/engines.md has the table and the sources):

| engine       | linear attn / FFN | FFN width from                   | other rules                                  |
|--------------|-------------------|----------------------------------|----------------------------------------------|
| vllm         | no / no           | ffn_mult, else intermediate_size | some attention must be real (KV sizing)      |
| sglang       | no / no           | ffn_mult                         | some attention must be real                  |
| tensorrt_llm | yes / yes         | ffn_mult                         |                                              |
| llamacpp     | yes / no          | ffn_mult, a key in every layer   | a no-op FFN only where attention is no-op    |
|              |                   |                                  | too (else its graph drops the attention      |
|              |                   |                                  | output), never in the last layer (aborts)    |
| mlx_lm       | no / no           | ffn_mult                         | rejects other FFN keys (intermediate_size);  |
|              |                   |                                  | head_dim must be hidden / heads              |

vLLM, SGLang and TensorRT-LLM read `block_configs` through the export's own config class (trust_remote_code), the
others read config.json. Every engine serves no-op subblocks. mlx-lm's model file has linear subblocks, but under
weight names (`self_attn.linear`, `mlp.linear`) other than the Hugging Face ones an export carries
(`self_attn.linear_attn`, `mlp.linear_mlp`), so puzzle counts them as not served there.

An engine that reads only `ffn_mult` builds an FFN of width int(2 * ffn_mult * hidden / 3) rounded up to a multiple
of 256 (`ffn_mult_to_intermediate_size`), so only such widths load there. `target.engines` restricts a search space
to what every named engine serves (`attention_problem`, `ffn_problem`, `block_problem`), and
`puzzle check-export DIR` says, per engine, whether an export loads and why not.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError, PuzzleError
from puzzle.model.block_config import (
    FFN_MULT_MULTIPLE,
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ffn_mult_for,
    ffn_mult_to_intermediate_size,
)

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
MLX_FFN_KEYS = ("no_op", "replace_with_linear", "sparsify", "ffn_mult")
"""The only keys mlx-lm's FFNConfig takes (it is built with FFNConfig(**entry))."""


@dataclass(frozen=True)
class Engine:
    """One serving engine's support for nemotron-nas checkpoints (see the module doc)."""

    name: str
    label: str
    linear_attention: bool = False
    linear_ffn: bool = False
    reads_intermediate_size: bool = False
    """False: the FFN width comes from ffn_mult alone."""
    needs_attention: bool = False
    """At least one layer must keep a real attention."""
    ffn_mult_in_every_layer: bool = False
    """config.json must carry an ffn_mult key (null for no-op and linear FFNs) in every layer."""
    no_op_ffn_needs_no_op_attention: bool = False
    last_layer_needs_ffn: bool = False
    converter_head_size_from_hidden: bool = False
    """The engine's own converter writes hidden_size / num_attention_heads as the head size, whatever head_dim says
    (puzzle's client for it writes head_dim, so this is a note, not a problem)."""
    head_dim_from_hidden: bool = False
    """Attention is sized from hidden_size / num_attention_heads: a config whose head_dim differs does not load."""
    ffn_keys: tuple[str, ...] | None = None
    """The only FFN keys config.json may carry; None: any."""
    keys_on: str = "architectures"
    """How the engine picks its model class: "architectures" or "model_type"."""


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine("vllm", "vLLM", reads_intermediate_size=True, needs_attention=True),
        Engine("sglang", "SGLang", needs_attention=True),
        Engine("tensorrt_llm", "TensorRT-LLM", linear_attention=True, linear_ffn=True),
        Engine(
            "llamacpp",
            "llama.cpp",
            linear_attention=True,
            converter_head_size_from_hidden=True,
            ffn_mult_in_every_layer=True,
            no_op_ffn_needs_no_op_attention=True,
            last_layer_needs_ffn=True,
        ),
        Engine("mlx_lm", "mlx-lm", head_dim_from_hidden=True, ffn_keys=MLX_FFN_KEYS, keys_on="model_type"),
    )
}


def engines_named(names: list[str] | tuple[str, ...], where: str = "target.engines") -> list[Engine]:
    """The engines for `names`; an unknown name raises ConfigError."""
    out = []
    for name in names:
        if name not in ENGINES:
            raise ConfigError(f"{where}: unknown engine {name!r}; known: {', '.join(ENGINES)}")
        out.append(ENGINES[name])
    return out


def attention_problem(attention: AttentionConfig, engine: Engine) -> str | None:
    """Why `engine` cannot serve this attention subblock, or None if it can."""
    if attention.replace_with_linear and not engine.linear_attention:
        return LINEAR_ATTENTION
    return None


def ffn_problem(ffn: FFNConfig, engine: Engine, hidden_size: int) -> str | None:
    """Why `engine` cannot serve this FFN subblock, or None if it can."""
    if ffn.replace_with_linear and not engine.linear_ffn:
        return LINEAR_FFN
    if ffn.is_mlp and not engine.reads_intermediate_size and ffn_mult_for(ffn.intermediate_size, hidden_size) is None:
        return _unexpressible(ffn.intermediate_size)
    return None


def shape_problem(hidden_size: int, heads: int, head_dim: int | None, engine: Engine) -> str | None:
    """Why `engine` cannot serve a model of these dimensions at all, or None."""
    if engine.head_dim_from_hidden and head_dim is not None and head_dim * heads != hidden_size:
        return (
            f"head_dim {head_dim} is not hidden_size / num_attention_heads = {hidden_size // heads} "
            f"({engine.label} sizes attention from the latter)"
        )
    return None


def block_problem(block: BlockConfig, engine: Engine, last: bool) -> str | None:
    """Why `engine` cannot serve this (attention, FFN) pair in a layer (`last`: the model's last layer), beyond what
    `attention_problem` and `ffn_problem` say of each subblock."""
    return next(iter(_pair_problems(engine, block.attention.no_op, block.ffn.no_op, last)), None)


def _pair_problems(engine: Engine, attention_no_op: bool, ffn_no_op: bool, last: bool) -> list[str]:
    """The rules on a layer's (attention, FFN) pair, from its no-op flags: for a block and for a config.json entry."""
    out = []
    if ffn_no_op and engine.no_op_ffn_needs_no_op_attention and not attention_no_op:
        out.append(NO_OP_FFN_AFTER_ATTENTION)
    if ffn_no_op and last and engine.last_layer_needs_ffn:
        out.append(NO_OP_FFN_LAST)
    return out


LINEAR_ATTENTION = "a linear attention (replace_with_linear)"
LINEAR_FFN = "a linear FFN (replace_with_linear)"
NO_OP_FFN_AFTER_ATTENTION = "a no-op FFN after a real attention (llama.cpp drops that layer's attention output)"
NO_OP_FFN_LAST = "a no-op FFN in the last layer (llama.cpp aborts)"


def _unexpressible(width: int) -> str:
    return f"FFN width {width}, which ffn_mult cannot express (only multiples of {FFN_MULT_MULTIPLE})"


def servable_attention(attention: AttentionConfig, engines: list[Engine]) -> bool:
    return all(attention_problem(attention, e) is None for e in engines)


def servable_ffn(ffn: FFNConfig, engines: list[Engine], hidden_size: int) -> bool:
    return all(ffn_problem(ffn, e, hidden_size) is None for e in engines)


def servable_block(block: BlockConfig, engines: list[Engine], last: bool) -> bool:
    return all(block_problem(block, e, last) is None for e in engines)


@dataclass(frozen=True)
class Verdict:
    """Whether one engine loads an export, the reasons it does not, and notes on how (which do not stop it)."""

    engine: Engine
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def loads(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.loads:
            return f"{self.engine.name:<13} loads" + "".join(f" (note: {note})" for note in self.notes)
        return f"{self.engine.name:<13} does not load: {'; '.join(self.problems)}"


def check_config(config: dict[str, Any], engines: list[Engine]) -> list[Verdict]:
    """Check an export's config.json (as a dict) against each engine, reading the fields that engine reads."""
    return [Verdict(engine, tuple(_problems(config, engine)), tuple(_notes(config, engine))) for engine in engines]


def _notes(config: dict[str, Any], engine: Engine) -> list[str]:
    hidden, heads, head_dim = config.get("hidden_size"), config.get("num_attention_heads"), config.get("head_dim")
    known = isinstance(hidden, int) and isinstance(heads, int) and head_dim
    if engine.converter_head_size_from_hidden and known and head_dim * heads != hidden:
        return [
            f"{engine.label}'s own converter writes hidden / heads = {hidden // heads} as the head size, not head_dim "
            f"{head_dim}; convert with puzzle's {engine.label} client (the serve stage), which writes head_dim"
        ]
    return []


def _problems(config: dict[str, Any], engine: Engine) -> list[str]:
    problems = []
    if engine.keys_on == "architectures" and ARCHITECTURE not in (config.get("architectures") or []):
        problems.append(f"architectures is {config.get('architectures')}, not [{ARCHITECTURE!r}]")
    if engine.keys_on == "model_type" and config.get("model_type") != MODEL_TYPE:
        problems.append(f"model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    blocks = config.get("block_configs")
    if not isinstance(hidden, int) or not isinstance(heads, int) or not isinstance(blocks, list):
        return [*problems, "config.json lacks hidden_size, num_attention_heads or block_configs"]
    if problem := shape_problem(hidden, heads, config.get("head_dim"), engine):
        problems.append(problem)
    found: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        for problem in _block_problems(block, engine, hidden, heads, last=i == len(blocks) - 1):
            found.setdefault(problem, []).append(i)
    problems += [f"{_layers(layers)}: {problem}" for problem, layers in found.items()]
    if engine.needs_attention and blocks and all((b.get("attention") or {}).get("no_op") for b in blocks):
        problems.append(f"every attention is no-op ({engine.label} sizes its KV cache from the first real one)")
    return problems


def _block_problems(block: dict[str, Any], engine: Engine, hidden: int, heads: int, last: bool) -> list[str]:
    attention, ffn = block.get("attention") or {}, block.get("ffn") or {}
    out = []
    if attention.get("replace_with_linear") and not engine.linear_attention:
        out.append(LINEAR_ATTENTION)
    elif not (attention.get("no_op") or attention.get("replace_with_linear")):
        group = attention.get("n_heads_in_group")
        if not isinstance(group, int) or group < 1 or heads % group:
            out.append(f"n_heads_in_group={group!r} does not divide {heads} attention heads")
    if engine.ffn_keys is not None:
        out += [f"FFN key {key!r}, which {engine.label} does not accept" for key in ffn if key not in engine.ffn_keys]
    active = not (ffn.get("no_op") or ffn.get("replace_with_linear"))
    if not active and engine.ffn_mult_in_every_layer and "ffn_mult" not in ffn:
        out.append(f"no ffn_mult key ({engine.label} reads it in every layer, null for a no-op FFN)")
    if ffn.get("replace_with_linear") and not engine.linear_ffn:
        out.append(LINEAR_FFN)
    elif active:
        out += _width_problems(ffn, engine, hidden)
    return out + _pair_problems(engine, bool(attention.get("no_op")), bool(ffn.get("no_op")), last)


def _width_problems(ffn: dict[str, Any], engine: Engine, hidden: int) -> list[str]:
    """The FFN width the engine builds must be the width of the exported weights."""
    width, mult = ffn.get("intermediate_size"), ffn.get("ffn_mult")
    from_mult = ffn_mult_to_intermediate_size(float(mult), hidden) if _number(mult) else None
    if from_mult is not None and isinstance(width, int) and from_mult != width:
        return [f"ffn_mult={mult} gives width {from_mult}, not intermediate_size={width}"]
    if from_mult is not None or (engine.reads_intermediate_size and isinstance(width, int)):
        return []
    if isinstance(width, int) and ffn_mult_for(width, hidden) is None:
        return [_unexpressible(width)]
    return [f"no ffn_mult ({engine.label} reads the width only from it)"]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _layers(layers: list[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))


def check_export(path: str | Path, engines: list[Engine]) -> list[Verdict]:
    """Check the export directory `path` (its config.json) against `engines`; a missing or unreadable config is a
    PuzzleError (exit 2)."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except OSError as err:
        raise PuzzleError(f"{path}: cannot read config.json ({err.strerror or err}); is it a puzzle export?") from err
    except json.JSONDecodeError as err:
        raise PuzzleError(f"{config_file}: invalid JSON ({err})") from err
    if not isinstance(config, dict):
        raise PuzzleError(f"{config_file}: expected a JSON object")
    return check_config(config, engines)


def _cmd_check_export(args: argparse.Namespace) -> int:
    names = [n.strip() for arg in args.engines or [] for n in arg.split(",") if n.strip()] or list(ENGINES)
    verdicts = check_export(args.export, engines_named(names, where="--engines"))
    if args.json:
        print(json.dumps({v.engine.name: {"loads": v.loads, "problems": list(v.problems), "notes": list(v.notes)}
                          for v in verdicts}))  # fmt: skip
    else:
        for verdict in verdicts:
            print(verdict.line())
    return 0 if all(v.loads for v in verdicts) else 1


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-export",
        help="say, per serving engine, whether an export loads there and why not",
        description="Check a puzzle export's config.json against what each serving engine reads "
        f"({', '.join(ENGINES)}). Exit 0 when every named engine loads it, 1 when one does not.",
    )
    parser.add_argument("export", help="an export directory (runs/<name>/export/child, or any nemotron-nas checkpoint)")
    parser.add_argument("--engines", nargs="+", default=None, help=f"some of {' '.join(ENGINES)} (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_cmd_check_export)
