"""Recipe schema (pydantic, strict) and YAML loading that keeps line numbers, so that every problem is reported
as one line: `file:line: field: what is wrong (allowed values)`."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from compress.config import DataConfig, EvalConfig, HubPush, RandomInit, Strict
from compress.config.base import MAX_SEED
from compress.config.data import data_dir
from compress.config.sources import DTYPE_NAMES, STEP_FOLDER_NAME, check_source_name, step_folder_name
from compress.errors import RecipeError
from compress.steps import KINDS, spec_of, teacher_name


class _StepBase(Strict):
    """One list item of `steps:`: a mapping with exactly one key, the step kind, whose value is its config."""

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        kinds = list(KINDS)
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
    def config(self) -> Strict:
        return getattr(self, self.kind)

    @property
    def spec(self):
        return spec_of(self.config)


def _kind_annotation(specs) -> Any:
    """A kind's config type: its one config class, or the classes of its methods discriminated on `method`."""
    if len(specs) == 1:
        return specs[0].config | None
    return Annotated[Union[tuple(spec.config for spec in specs)], Field(discriminator="method")] | None


# the step kinds and their configs come from the step specs: a new method needs no edit here
Step = create_model("Step", __base__=_StepBase, **{kind: (_kind_annotation(specs), None)
                                                   for kind, specs in KINDS.items()})


def order_problems(recipe: "Recipe") -> list[tuple[tuple, str]]:
    """(location, problem) for every step the specs do not allow where it stands: a step that needs a float model
    after a step that quantizes, and a teacher that is not an earlier step."""
    problems = []
    quantized_by = None
    calibrated_at = None  # a step calibrated on the weights as they were (compress.steps: needs_final_weights)
    for index, step in enumerate(recipe.steps):
        spec = step.spec
        if calibrated_at is not None and not spec.needs_final_weights:
            earlier = recipe.steps[calibrated_at]
            problems.append((("steps", index, step.kind), (
                f"{spec.name} cannot follow steps[{calibrated_at}] ({earlier.spec.name}): that step is calibrated on "
                f"the weights before it, which this one would change; put the {earlier.kind} step last")))
        if spec.needs_final_weights:
            calibrated_at = index
        if quantized_by is not None and not spec.accepts_quantized:
            earlier_index, earlier = quantized_by
            problems.append((("steps", index, step.kind), (
                f"{spec.name} cannot follow steps[{earlier_index}] ({earlier.name}): it needs a float model and would "
                f"move the weights off the quantization grid; put it before the quantize step (or after a "
                f"`- dequantize: {{}}` step)")))
        if spec.quantizes and quantized_by is None:
            quantized_by = (index, spec)
        if spec.dequantizes:
            quantized_by = None
        teacher = teacher_name(step.config)
        match = STEP_FOLDER_NAME.match(teacher or "")
        if match and int(match[1]) > index:
            problems.append((("steps", index, step.kind, "kd", "teacher"), (
                f"teacher '{teacher}' is not an earlier step: this step writes {step_folder_name(index + 1, step.kind)}"
                f"; use base or a folder numbered below {index + 1:02d}")))
        elif match and quantized_by is not None and int(match[1]) > quantized_by[0] and int(match[1]) <= index:
            problems.append((("steps", index, step.kind, "kd", "teacher"), (
                f"teacher '{teacher}' is quantized (steps[{quantized_by[0]}] quantized the model): a teacher on a "
                f"grid teaches its rounding errors; name a step folder numbered {quantized_by[0]:02d} or below, or "
                f"leave teacher out for the model before quantization")))
    return problems


def default_teacher(steps: list, index: int) -> str:
    """The teacher of steps[index] when its kd block names none: base for distillation; for a quantizing step the
    model before quantization: the folder of the step before the first quantize step, or the step's own input."""
    if not steps[index].spec.quantizes:
        return "base"
    first = next((i for i in range(index) if steps[i].spec.quantizes), index)
    return "base" if first == 0 else step_folder_name(first, steps[first - 1].kind)


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    model: str | RandomInit = Field(description="registry name, hub id, folder, .gguf file, or "
                                                "{config: llama2-7b, init: random}")
    dtype: Literal[DTYPE_NAMES] = "float32"  # type: ignore[valid-type]
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto = cuda when available")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    data: DataConfig = DataConfig()
    steps: list[Step] = Field(min_length=1, max_length=99)  # type: ignore[valid-type]  # folders are numbered NN-
    eval: EvalConfig = EvalConfig()
    output_dir: str | None = None
    hub: HubPush | None = Field(None, description="push a step folder with a model card after the run")

    @field_validator("model")
    @classmethod
    def _model_source(cls, value: str | RandomInit) -> str | RandomInit:
        return check_source_name(value) if isinstance(value, str) else value  # resolvable without loading anything

    @model_validator(mode="after")
    def _order(self, info: ValidationInfo):
        if not (info.context or {}).get("order_checked_by_loader"):
            problems = order_problems(self)
            if problems:
                raise ValueError("; ".join(message for _, message in problems))
        return self

    def resolved(self) -> "Recipe":
        """The recipe with every inherited default filled in, as it is fingerprinted and written to the run: the data
        directory found now, and each calibrating step's calibration set (its own, else data.calibration)."""
        found = data_dir(self.data.dir)
        data = self.data.model_copy(update={"dir": str(found.resolve()) if found else None})
        steps = []
        for step in self.steps:
            config = step.config
            if spec_of(config).calibrates and config.calibration is None:
                config = config.model_copy(update={"calibration": data.calibration})
            if teacher_name(config) is None and getattr(config, "kd", None) is not None:
                kd = config.kd.model_copy(update={"teacher": default_teacher(self.steps, len(steps))})
                config = config.model_copy(update={"kd": kd})
            steps.append(Step(**{step.kind: config}))
        return self.model_copy(update={"data": data, "steps": steps})

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


# ---------------------------------------------------------------- YAML with line numbers


def _lines(node: yaml.Node, path: tuple = (), out: dict | None = None,
           duplicates: list | None = None) -> dict[tuple, int]:
    """Map every key path in the document to the (1-based) line where it appears; a key given twice in one mapping
    is appended to `duplicates` as (path, first line, second line)."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            child = path + (key.value,)
            line = key.start_mark.line + 1
            if key.value in seen and duplicates is not None:
                duplicates.append((child, seen[key.value], line))
            seen.setdefault(key.value, line)
            out[child] = line
            _lines(value, child, out, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[path + (i,)] = item.start_mark.line + 1
            _lines(item, path + (i,), out, duplicates)
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


def _tagged_members(annotation: Any) -> dict[str, type[Strict]]:
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


def _walk(loc: tuple) -> tuple[tuple, type[Strict] | None]:
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


RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "too_short")


def _allowed_range(raw: tuple) -> str:
    """The bounds of the field at `raw`, as `1 to 10000000` / `> 0` / `at most 99 items`."""
    owner = _walk(raw[:-1])[1]
    field = owner.model_fields.get(raw[-1]) if owner else None
    bounds = {}
    for meta in field.metadata if field else ():
        for name in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if getattr(meta, name, None) is not None:
                bounds[name] = getattr(meta, name)
    if "min_length" in bounds or "max_length" in bounds:
        return f"{bounds.get('min_length', 0)} to {bounds.get('max_length', 'any number of')} items"
    number = lambda value: str(value) if isinstance(value, int) else f"{value:g}"  # noqa: E731
    low = number(bounds["ge"]) if "ge" in bounds else (f"more than {number(bounds['gt'])}" if "gt" in bounds else "")
    high = number(bounds["le"]) if "le" in bounds else (f"less than {number(bounds['lt'])}" if "lt" in bounds else "")
    if low and high:
        return f"{low} to {high}" if "ge" in bounds and "le" in bounds else f"{low} and {high}"
    return (f"at least {low}" if "ge" in bounds else low) or (f"at most {high}" if "le" in bounds else high)


def _belongs_in(owner: type[BaseModel] | None, name: str) -> str:
    """A hint when an unknown field is a field of one of the owner's nested blocks (`r` of `lora:`)."""
    for field, info in (owner.model_fields.items() if owner else ()):
        block = _unwrap(info.annotation)
        if isinstance(block, type) and issubclass(block, BaseModel) and name in block.model_fields:
            return f" here: it belongs in the {field} block ({field}: {{{name}: ...}})"
    return ""


def _message(error: dict) -> tuple[tuple, str]:
    raw, kind, value = tuple(error["loc"]), error["type"], error.get("input")
    loc = _walk(raw)[0]
    if kind == "extra_forbidden":
        owner = _walk(raw[:-1])[1]
        fields = sorted(owner.model_fields, key=lambda name: name != "method") if owner else []  # method first
        allowed = f"; allowed: {', '.join(fields)}" if owner else ""
        return loc, f"unknown field '{loc[-1]}'{_belongs_in(owner, loc[-1])}{allowed}"
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
    if kind in RANGE_ERRORS:
        return loc, f"got {value!r}; allowed: {_allowed_range(raw)}"
    return loc, f"{error['msg'].rstrip('.')} (got {value!r})"


def _parse_error(path: Path, error: yaml.YAMLError) -> RecipeError:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    line = mark.line + 1 if mark else 1
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return RecipeError([f"{path}:{line}: malformed YAML: {problem}"])


def locate(path: str | Path, loc: tuple) -> str:
    """`file:line: field` of a setting found wrong after loading (e.g. against the model): the recipe file is
    parsed again for its line numbers."""
    node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    return f"{path}:{_line_of(loc, _lines(node))}: {_field_path(loc)}"


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
        raise RecipeError([f"{path}:1: recipe: expected a mapping of recipe fields (name, model, steps, ...), "
                           f"got {got}"])
    duplicates: list = []
    lines_of = _lines(node, duplicates=duplicates)
    if duplicates:  # PyYAML keeps the later value silently: a typo'd override would go unnoticed
        raise RecipeError([f"{path}:{second}: {_field_path(key)}: duplicate key '{key[-1]}' (first at line {first}); "
                           f"give each key once" for key, first, second in duplicates])
    try:
        recipe = Recipe.model_validate(document, context={"order_checked_by_loader": True})
    except ValidationError as error:
        located = [_message(item) for item in error.errors()]
        messages = []
        for loc, message in located:
            # a union field (model: str | {config, init}) fails each branch; the type error of the branch the
            # input was not meant for is noise when the other branch says what is wrong
            if message.startswith("Input should be a valid") and any(
                    other[: len(loc)] == loc and other != loc for other, _ in located):
                continue
            messages.append(f"{path}:{_line_of(loc, lines_of)}: {_field_path(loc)}: {message}")
        raise RecipeError(messages)
    problems = order_problems(recipe)
    if problems:
        raise RecipeError([f"{path}:{_line_of(loc, lines_of)}: {_field_path(loc)}: {message}"
                           for loc, message in problems])
    return recipe


def resolved_yaml(recipe: Recipe) -> str:
    """The recipe with every default filled in (`recipe.resolved()`), as written to the run folder."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
