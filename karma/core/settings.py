"""The settings machinery: sections, fields, validation errors, params files.

Each stage family declares its section in its own ``settings.py``; :mod:`karma.params` composes
them into the root model. The functions here take that root as an argument.

Originally: every setting of the pipeline, defined once.

Each params section is a pydantic model: a field's type, default, range or choices and help text
live here and nowhere else. From these models come

* the validation of ``params.yaml`` (:func:`load_params`): unknown keys are refused with a
  did-you-mean, and every error names its real source (the params file and key, or the flag);
* the options of the ``karma`` commands (generated in :mod:`karma.core.stage`);
* the documented defaults: ``karma params`` prints them as a commented ``params.yaml``, which is
  how the committed ``params.yaml`` was written.

Fields marked *operational* change how a stage runs (processes, threads, caches, log dirs), never
what it writes, so ``dvc.yaml`` does not track them.

Why pydantic rather than dataclass metadata (TRL's choice): ranges, choices and unknown keys
are declared on the field and checked by one validator, which reports the location of every
error; with dataclasses each check is hand-written in ``__post_init__``.

"""

from __future__ import annotations

import contextlib
import contextvars
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from karma.core.errors import MAX_INT_DIGITS, KarmaError, did_you_mean, shorten

PARAMS_FILE = "params.yaml"

# --------------------------------------------------------------------------- names

Similarity = Literal["cosine", "pearson", "euclidean"]
Rating = Literal["overall_score", "fine_grained_score"]
Layout = Literal["trl", "h4"]
BaselinePool = Literal["scored", "all"]
ClusterDistance = Literal["rms", "euclidean", "cityblock", "cosine", "correlation"]
ClusterLinkage = Literal["average", "complete", "single", "weighted", "ward", "centroid", "median"]
#: The default tau grid of the sweep: -1 to 1 in steps of 0.05.
TAU_GRID = [round(-1 + 0.05 * i, 2) for i in range(41)]
Dtype = Literal["float32", "bfloat16", "float16"]
SelectMethod = Literal["none", "map", "explicit", "implicit", "random"]
ExplicitMargin = Literal["s_pref_gap", "rating_gap"]

#: How the multiple-choice benchmarks are scored (IFEval always by its own checks):
#: ``loglik``: the log-likelihood of each option (lm-eval's default tasks);
#: ``paper``: the KARMA paper's prompting: the model writes its reasoning and the answer letter
#: is extracted (MMLU-Pro style); ``mixed``: some of each (lm-eval's default suite: generative
#: MMLU-Pro and IFEval, log-likelihood for the rest); ``custom``: a ``tasks`` map of the user's.
Protocol = Literal["loglik", "paper", "mixed", "custom"]

#: The six benchmark families, in the order of the KARMA paper's tables.
BENCHMARKS = ("ifeval", "mmlu_stem", "mmlu_pro", "hellaswag", "arc_easy", "arc_challenge")
#: lm-eval fraction -> the paper table's unit (percent; its MMLU-Pro column is a fraction).
PAPER_SCALE = {b: (1.0 if b == "mmlu_pro" else 100.0) for b in BENCHMARKS}
#: The paper's Table 2 (and Table 4) benchmarks, in its column order; its Total is their 0-1
#: mean (HellaSwag is only in the origin-model table).
TABLE2_BENCHMARKS = ("mmlu_stem", "mmlu_pro", "arc_easy", "arc_challenge", "ifeval")
DEFAULT_GROUPS = {
    "knowledge": ["mmlu_stem", "mmlu_pro"],
    "reasoning": ["arc_easy", "arc_challenge", "hellaswag"],
    "instruction_following": ["ifeval"],
}


def setting(default: Any, help: str, *, operational: bool = False, **constraints: Any) -> Any:
    """A field with its default, help text and constraints (``ge``, ``gt``, ``le``, ...).

    A section class as ``default`` becomes its default factory.
    """
    extra = {"operational": True} if operational else None
    if isinstance(default, type):
        return Field(default_factory=default, description=help, json_schema_extra=extra)
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class Section(BaseModel):
    """Base of every params section: unknown keys refused, defaults validated, immutable.

    A number field refuses ``true``/``false`` (pydantic would read them as 1 and 0).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        bad = {
            name: "true" if value else "false"  # as text: the number parser names the field
            for name, value in data.items()
            if isinstance(value, bool)
            and name in cls.model_fields
            and _is_number(cls.model_fields[name].annotation)
        }
        return {**data, **bad} if bad else data


def _is_number(annotation: Any) -> bool:
    args = set(typing.get_args(annotation)) or {annotation}
    return bool(args & {int, float}) and bool not in args


class LimitsConfig(Section):
    """Input limits of every reader: bad or hostile input fails fast, in one line.

    Operational: a run within the limits writes the same outputs whatever they are.
    """

    max_columns: int = setting(
        1000, "columns of a score table (model + benchmarks)", ge=2, operational=True
    )
    max_line_bytes: int = setting(
        16 * 2**20, "longest line of a text file (CSV, TSV, JSONL, task data)", ge=64,
        operational=True,
    )  # fmt: skip
    max_record_bytes: int = setting(
        16 * 2**20, "text of one record: a completions record (instruction + responses), a "
        "preference pair, a CSV field", ge=64, operational=True,
    )  # fmt: skip
    max_file_bytes: int = setting(
        256 * 2**20, "a file parsed whole (.json); larger data: use .jsonl or .parquet", ge=64,
        operational=True,
    )  # fmt: skip
    max_yaml_bytes: int = setting(
        2**20, "a YAML file: params, training recipes, lm-eval task configs", ge=64,
        operational=True,
    )  # fmt: skip


def section_type(annotation: Any) -> type[Section] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None


def field_at(root: type[Section], key: str) -> tuple[type[Section], str] | None:
    """``(model, field name)`` of a dotted params key (``select.ratio``), or None."""
    model: type[Section] = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            return None
        if i == len(parts) - 1:
            return model, part
        sub = section_type(info.annotation)
        if sub is None:  # a key inside a mapping field (train.trl.max_steps), else not a key
            return (model, part) if "mapping" in describe(info.annotation) else None
        model = sub
    return None


def iter_fields(model: type[Section], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf setting as ``(dotted key, FieldInfo)``, sections expanded."""
    for name, info in model.model_fields.items():
        sub = section_type(info.annotation)
        if sub is not None:
            yield from iter_fields(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def is_operational(info: Any) -> bool:
    """Whether a field changes only how a stage runs (not tracked by DVC)."""
    return bool((info.json_schema_extra or {}).get("operational"))


def describe(annotation: Any) -> str:
    """Human form of a field type: ``'a' | 'b'``, ``int >= 1``, ``mapping``..."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " | ".join(describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin is dict or annotation is dict:
        return "mapping"
    if origin is list:
        return "list"
    if origin is Annotated:
        return describe(typing.get_args(annotation)[0])
    return getattr(annotation, "__name__", str(annotation))


def bounds(info: Any, name: str) -> str | None:
    """``0 < ratio <= 1`` from a field's ``gt``/``ge``/``lt``/``le`` constraints."""
    low = high = ""
    for m in info.metadata:
        for attr, text in (("gt", " < "), ("ge", " <= ")):
            if getattr(m, attr, None) is not None:
                low = f"{getattr(m, attr):g}{text}"
        for attr, text in (("lt", " < "), ("le", " <= ")):
            if getattr(m, attr, None) is not None:
                high = f"{text}{getattr(m, attr):g}"
    return f"{low}{name}{high}" if low or high else None


# --------------------------------------------------------------------------- errors


def validation_error(
    exc: ValidationError, source: Any, root: type[Section], moved: Mapping[str, str]
) -> KarmaError:
    """The first error of a validation, as one line naming its source and key.

    ``source(key)`` gives ``(label, key shown)`` for a dotted key: the params file and the key,
    or the command-line flag that set it.
    """
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if p != "[key]"]
    # drop union-member tags (``bool``, ``literal['generative']``) that pydantic appends
    while (
        err["type"] != "extra_forbidden" and len(loc) > 1 and field_at(root, ".".join(loc)) is None
    ):
        loc.pop()
    key = ".".join(loc)
    found = field_at(root, key)
    info = found[0].model_fields[found[1]] if found else None
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = field_at(root, ".".join(loc[:-1])) if len(loc) > 1 else None
        model = root if parent is None else section_type(
            parent[0].model_fields[parent[1]].annotation
        )  # fmt: skip
        known = sorted(model.model_fields) if model else []
        hint = f"; moved to {moved[key]!r}" if key in moved else did_you_mean(loc[-1], known)
        message, expected, value = f"unknown key{hint}", ", ".join(known), None
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        message = "out of range"
        expected = bounds(info, loc[-1]) if info is not None and info.metadata else None
        expected = expected or err["msg"].removeprefix("Input should be ")
    elif kind == "literal_error" or (info and typing.get_origin(info.annotation) is Literal):
        choices = [str(a) for a in typing.get_args(info.annotation)] if info else []
        message = f"not one of the choices{did_you_mean(value, choices)}"
        expected = describe(info.annotation) if info else err["ctx"]["expected"]
    elif kind == "value_error":
        message, expected = err["msg"].removeprefix("Value error, "), None
    elif info is not None and kind.endswith(("_type", "_parsing", "_from_float")):
        message, expected = "wrong type", describe(info.annotation)
    else:
        message, expected = err["msg"].removeprefix("Input should be "), None
    label, shown = source(key)
    if isinstance(value, (dict, list)) and kind != "extra_forbidden":
        value = shorten(value, 120)  # never expanded whole: it may be huge
    return KarmaError(message, file=label, field=shown, value=value, expected=expected)


# --------------------------------------------------------------------------- loading

#: The deepest nesting of mappings and lists accepted in a params file or a -S value.
MAX_YAML_DEPTH = 32
#: The most values a params document may hold with its aliases expanded (a 300-byte alias bomb
#: expands to billions: refused before anything is built or printed).
MAX_YAML_NODES = 100_000


class BoundedLoader(yaml.SafeLoader):
    """YAML for params: aliases expanding to at most ``MAX_YAML_NODES`` values, nesting at most
    ``MAX_YAML_DEPTH``, integers of at most ``MAX_INT_DIGITS`` digits, no duplicate key, no lone
    surrogate. A refusal is a ``ConstructorError`` with the line."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.depth = 0
        self.sizes: dict[int, int] = {}  # id(node) -> values under it, aliases expanded

    def _refuse(self, problem: str) -> None:
        raise yaml.constructor.ConstructorError(None, None, problem, self.peek_event().start_mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)  # its size: the anchored node's
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        children = node.value if isinstance(node, yaml.CollectionNode) else []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in children for n in pair]
        size = 1 + sum(self.sizes.get(id(n), 1) for n in children)
        if size > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"aliases expand to more than {MAX_YAML_NODES} values",
                node.start_mark,
            )
        self.sizes[id(node)] = size
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shorten(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        digits = str(node.value).lstrip("+-").replace("_", "")
        if len(digits) > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"an integer of {len(digits)} digits, more than {MAX_INT_DIGITS}",
                node.start_mark,
            )
        return super().construct_yaml_int(node)

    def construct_yaml_str(self, node: Any) -> str:
        value = super().construct_yaml_str(node)
        if any("\ud800" <= c <= "\udfff" for c in value):
            raise yaml.constructor.ConstructorError(
                None, None, "a lone surrogate in a string (not valid Unicode)", node.start_mark
            )
        return value


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)
BoundedLoader.add_constructor("tag:yaml.org,2002:str", BoundedLoader.construct_yaml_str)


def load_yaml(text: str) -> Any:
    """A YAML document with :class:`BoundedLoader` (errors: ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=BoundedLoader)


def yaml_problem(err: yaml.YAMLError, what: str) -> str:
    """``line N: <what>: <problem>`` of a YAML error, one line."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return f"{where}{what}: {' '.join(str(problem).split())}"


def read_yaml(path: str | Path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """A YAML mapping from ``path``; one-line errors for a missing, oversized or bad file.

    ``max_bytes``: the size cap (default ``limits.max_yaml_bytes`` of the running stage).
    """
    p = Path(path)
    if p.is_dir():
        raise KarmaError("is a directory", file=p, expected="a YAML file")
    if p.exists() and not p.is_file():
        raise KarmaError("not a regular file (a FIFO or device)", file=p,
                         expected="a YAML file")  # fmt: skip
    if not p.is_file():
        what = "a dangling symlink" if p.is_symlink() else "not found"
        raise KarmaError(f"params file {what}", file=p, expected="an existing YAML file")
    cap = max_bytes if max_bytes is not None else limits().max_yaml_bytes
    size = p.stat().st_size
    if size > cap:
        raise KarmaError(
            f"YAML file of {size} bytes, more than limits.max_yaml_bytes = {cap} (raise it "
            "with -S limits.max_yaml_bytes=N or in params.yaml)",
            file=p,
        )
    try:
        data = load_yaml(p.read_text(encoding="utf-8")) or {}
    except yaml.constructor.ConstructorError as err:  # a bound of BoundedLoader
        raise KarmaError(yaml_problem(err, "refused"), file=p) from None
    except yaml.YAMLError as err:
        raise KarmaError(yaml_problem(err, "not valid YAML"), file=p) from None
    except UnicodeDecodeError:
        raise KarmaError("not UTF-8 text", file=p) from None
    if not isinstance(data, dict):
        raise KarmaError("top level must be a mapping", file=p, value=type(data).__name__)
    return data


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """``data['a']['b'] = value`` for ``key = 'a.b'``, creating mappings on the way."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {} if child is None else child
        if not isinstance(child, dict):
            raise KarmaError("not a mapping", field=part, value=child)
        node = child
    node[last] = value


def build(
    root: type[Section],
    moved: Mapping[str, str],
    file: str | Path | None = None,
    overrides: list[tuple[str, Any, str]] = (),  # type: ignore[assignment]
) -> Any:
    """``root`` from the defaults, then ``file`` (if given), then ``overrides``.

    ``overrides``: ``(dotted key, value, label)`` where ``label`` names the flag that set it.
    Errors name the flag for an overridden key, else the file and the key.
    """
    # without a file, start from the defaults themselves, so that ``-S train.trl.max_steps=3``
    # changes one key of the default ``train.trl`` mapping instead of replacing the mapping
    cap = next((v for k, v, _ in overrides if k == "limits.max_yaml_bytes"), None)
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) else None
    data = read_yaml(file, max_bytes=cap) if file is not None else root().model_dump()
    for key, value, _ in overrides:
        set_key(data, key, value)

    try:
        return root.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, sources(file, overrides), root, moved) from None


def sources(file: str | Path | None, overrides: list[tuple[str, Any, str]] = ()) -> Any:  # type: ignore[assignment]
    """``source(key) -> (label, key shown)``: the flag that set ``key``, else the file and key."""
    labels = {key: label for key, _, label in overrides}

    def source(key: str) -> tuple[str, str | None]:
        if key in labels:
            return labels[key], None
        parents = [k for k in labels if key.startswith(k + ".")]
        if parents:  # inside a mapping the flag set: name the sub-key
            k = max(parents, key=len)
            return labels[k], key.removeprefix(k + ".")
        children = sorted(k for k in labels if k.startswith(key + "."))
        if children:  # several flags set keys under this one: name them all
            return " or ".join(labels[k] for k in children), None
        return (str(file) if file is not None else "defaults"), key

    return source


def with_source(err: KarmaError, source: Any, root: type[Section]) -> KarmaError:
    """``err`` naming the flag or params file of its field, when that field is a params key."""
    field = err.parts[2]
    if err.parts[1] is not None or field is None or field_at(root, field) is None:
        return err
    return err.sourced(*source(field))


def defaults_yaml(root: type[Section]) -> str:
    """The default ``params.yaml``, every key commented with its help text."""

    def emit(model: type[Section], obj: Section, indent: str) -> Iterator[str]:
        for name, info in model.model_fields.items():
            value = getattr(obj, name)
            note = info.description or ""
            if is_operational(info):
                note += " [operational: not tracked by DVC]"
            sub = section_type(info.annotation)
            if sub is not None:
                yield ""
                yield f"{indent}# {(sub.__doc__ or name).splitlines()[0].replace('``', '`')}"
                yield f"{indent}{name}:"
                yield from emit(sub, value, indent + "  ")
                continue
            data = plain(value)
            flow = not isinstance(data, dict) or not data or len(data) <= 1
            text = yaml.safe_dump({name: data}, default_flow_style=flow, sort_keys=False, width=90)
            if flow:
                text = text.strip().removeprefix("{").removesuffix("}") + "\n"
            yield f"{indent}# {note}"
            yield from (f"{indent}{line}" for line in text.rstrip().splitlines())

    head = "# KARMA pipeline params, written by `karma params` from karma/*/settings.py (the one\n"
    head += "# definition of every setting). `dvc exp run -S key=value` changes any of them.\n"
    return head + "\n".join(emit(root, root(), "")).replace("\n\n\n", "\n\n") + "\n"


def plain(value: Any) -> Any:
    """A settings value as plain YAML data (a nested value model: only the keys it sets)."""
    if isinstance(value, BaseModel):  # a value model (a pool entry): only what is set
        return value.model_dump(exclude_defaults=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- input limits

_LIMITS: contextvars.ContextVar[Any] = contextvars.ContextVar("karma_limits", default=None)


def limits() -> Any:
    """The active :class:`karma.params.LimitsConfig` (the stage's, else the defaults)."""
    active = _LIMITS.get()
    if active is None:
        active = LimitsConfig()
    return active


@contextlib.contextmanager
def use_limits(active: Any) -> Iterator[None]:
    """Make ``active`` the limits of every reader inside the block."""
    token = _LIMITS.set(active)
    try:
        yield
    finally:
        _LIMITS.reset(token)
