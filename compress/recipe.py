"""Recipe schema (pydantic, strict) and YAML loading that keeps line numbers, so that every problem is reported
as one line: `file:line: field: what is wrong (allowed values)`."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from compress.data import CalibrationData
from compress.errors import RecipeError
from compress.evaluate import TASKS, Perplexity
from compress.tasks import ChoiceEval
from compress.distill import Distill
from compress.finetune import LoRARecovery
from compress.hub import HubPush
from compress.models import DTYPES, STEP_FOLDER_NAME, RandomInit, check_source_name, resolve_source
from compress.prune import TaylorPrune
from compress.quantize import QuantizeConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    calibration: CalibrationData = CalibrationData()
    dir: str | None = Field(None, description="data directory; default: $COMPRESS_DATA_DIR, then ../shared/data")


class Step(Strict):
    """One list item of `steps:`: a mapping with exactly one key, the step kind, whose value is its config."""

    prune: TaylorPrune | None = None
    finetune: LoRARecovery | None = None
    distill: Distill | None = None
    quantize: QuantizeConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        kinds = [name for name in cls.model_fields]
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"a step is a mapping with one key, the step kind ({', '.join(kinds)}), "
                             f"e.g. `- quantize: {{method: rtn, bits: 4}}`")
        (kind,) = value
        if kind not in kinds:
            raise ValueError(f"unknown step '{kind}'; allowed: {', '.join(kinds)}")
        if value[kind] is None:
            return {kind: {}}
        return value

    @property
    def kind(self) -> str:
        return next(name for name in type(self).model_fields if getattr(self, name) is not None)

    @property
    def config(self) -> BaseModel:
        return getattr(self, self.kind)


class EvalConfig(Strict):
    tasks: list[Literal[TASKS]] = ["wikitext2"]  # type: ignore[valid-type]
    after: Literal["every_step", "last", "none"] = "every_step"
    wikitext2: Perplexity = Perplexity()
    choice: ChoiceEval = Field(ChoiceEval(), description="how the choice tasks (rte, politeness) are scored")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    model: str | RandomInit = Field(description="registry name, hub id, folder, .gguf file, or "
                                                "{config: llama2-7b, init: random}")
    dtype: Literal[tuple(DTYPES)] = "float32"  # type: ignore[valid-type]
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto = cuda when available")
    seed: int = 0
    data: DataConfig = DataConfig()
    steps: list[Step] = Field(min_length=1)
    eval: EvalConfig = EvalConfig()
    output_dir: str | None = None
    hub: HubPush | None = Field(None, description="push a step folder with a model card after the run")

    @field_validator("model")
    @classmethod
    def _model_source(cls, value: str | RandomInit) -> str | RandomInit:
        return check_source_name(value) if isinstance(value, str) else value  # resolvable without loading anything

    @model_validator(mode="after")
    def _teachers_come_first(self):
        for index, step in enumerate(self.steps):
            teacher = getattr(step.config, "teacher", None) or getattr(step.config, "distill_from", None)
            match = STEP_FOLDER_NAME.match(teacher or "")
            if match and int(match[1]) > index:
                raise ValueError(f"steps[{index}] ({step.kind}) names teacher '{teacher}', which is not an earlier "
                                 f"step: this step writes {index + 1:02d}-{step.kind}; use base or a folder numbered "
                                 f"below {index + 1:02d}")
        return self

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def model_description(self) -> str:
        return resolve_source(self.model).describe()

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


# ---------------------------------------------------------------- YAML with line numbers


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map every key path in the document to the (1-based) line where it appears."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            out[child] = key.start_mark.line + 1
            _lines(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _lines(item, path + (i,), out)
    return out


def _line_of(loc: tuple, lines: dict[tuple, int]) -> int:
    """The line of the deepest part of `loc` present in the document (pydantic inserts union/tag parts)."""
    path: tuple = ()
    line = lines.get((), 1)
    for part in loc:
        if path + (part,) in lines:
            path += (part,)
            line = lines[path]
    return line


def _field_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "recipe"


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] (a union with None) from an annotation."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
            rest = [a for a in args if a is not type(None)]
            annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
            continue
        return annotation


def _tagged_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """tag → class for a union discriminated on `method` (e.g. quantize: rtn | gptq); empty otherwise."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return {}
    return {arg.model_fields["method"].default: arg for arg in typing.get_args(annotation)
            if isinstance(arg, type) and issubclass(arg, BaseModel) and "method" in arg.model_fields}


def _union_branches(annotation: Any) -> dict[str, Any]:
    """Branch name → type for a plain union (e.g. model: str | RandomInit), as pydantic names them in locations."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return {}
    return {arg.__name__: arg for arg in typing.get_args(annotation) if isinstance(arg, type)}


def _walk(loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """Follow `loc` through the schema: returns the location without the union tags pydantic inserts (so it
    reads like the YAML) and the model class it points into (to list allowed fields), or None."""
    current: Any = Recipe
    clean: list = []
    for part in loc:
        current = _unwrap(current)
        members = _tagged_members(current) or _union_branches(current)
        if part in members:
            current = members[part]
            continue
        clean.append(part)
        if isinstance(part, int) and typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            current = None
    current = _unwrap(current)
    model = current if isinstance(current, type) and issubclass(current, BaseModel) else None
    return tuple(clean), model


def _message(error: dict) -> tuple[tuple, str]:
    raw, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    loc = _walk(raw)[0]
    if kind == "extra_forbidden":
        owner = _walk(raw[:-1])[1]
        fields = sorted(owner.model_fields, key=lambda name: name != "method") if owner else []  # method first
        allowed = f"; allowed: {', '.join(fields)}" if owner else ""
        return loc, f"unknown field '{loc[-1]}'{allowed}"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        tags = ", ".join(_tagged_members(_unwrap(_walk(loc[:-1])[1].model_fields[loc[-1]].annotation)))
        if kind == "union_tag_invalid":
            return loc + ("method",), f"unknown method {value.get('method')!r}; allowed: {tags}"
        return loc, f"'method' is missing; allowed: {tags}"
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "literal_error":
        return loc, f"got {value!r}; allowed: {error['ctx']['expected']}"
    if kind == "value_error":
        return loc, str(error["ctx"]["error"])
    return loc, f"{error['msg'].rstrip('.')} (got {value!r})"


def _parse_error(path: Path, error: yaml.YAMLError) -> RecipeError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line = mark.line + 1 if mark else 1
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return RecipeError([f"{path}:{line}: malformed YAML: {problem}"])


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe; raises RecipeError with one `file:line: field: problem` line per problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{path}: recipe file not found"])
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError([f"{path}: cannot read recipe: {error}"])
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise _parse_error(path, error)
    if not isinstance(document, dict):
        got = "an empty file" if document is None else f"a {type(document).__name__}"
        raise RecipeError([f"{path}:1: recipe: expected a mapping of recipe fields (name, model, steps, ...), got {got}"])
    try:
        return Recipe.model_validate(document)
    except ValidationError as error:
        lines = _lines(node)
        located = [_message(item) for item in error.errors()]
        messages = []
        for loc, message in located:
            # a union field (model: str | {config, init}) fails each branch; the type error of the branch the
            # input was not meant for is noise when the other branch says what is wrong
            if message.startswith("Input should be a valid") and any(
                    other[: len(loc)] == loc and other != loc for other, _ in located):
                continue
            messages.append(f"{path}:{_line_of(loc, lines)}: {_field_path(loc)}: {message}")
        raise RecipeError(messages)


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in, as written to the run folder."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
