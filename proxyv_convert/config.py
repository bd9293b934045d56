"""Configuration: the recipe schema, whose defaults are the only defaults, and the recipe files that use it.

A recipe is one YAML file that holds a whole run (`proxyv run RECIPE`), validated before anything runs:

    # proxyv run recipes/llava-1.5-7b.yaml
    output: ./llava-1.5-7b-proxyv-l12
    model: {source: llava-hf/llava-1.5-7b-hf, dtype: bfloat16}
    proxyv: {start_layer: 12, reduce_factor: 4}
    distill: {data: ..., steps: 500}
    eval: {data: ..., split: test}
    bench: {batch_sizes: [1, 8]}
    push: {repo_id: me/llava-1.5-7b-proxyv-l12}

The command-line options take their defaults from these sections too, so a flag, a recipe key and the `recipe.yaml`
that every model folder holds (the same sections plus `provenance`, written by the stages as they run) always agree.
Unknown keys are errors; `key.sub=value` overrides (values parsed as YAML) apply before validation.
"""

from __future__ import annotations

import datetime
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .errors import ProxyVError

BUILTIN_PREFIX = "builtin:"
STAGES = ("convert", "distill", "eval", "bench", "push")
RECIPE_FILE = "recipe.yaml"
SECTIONS = ("model", "proxyv", "distill", "eval", "bench", "push", "provenance")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(Section):
    source: str = Field(description="Hub id, local folder, or builtin:NAME")
    revision: str | None = None
    dtype: Dtype = "auto"
    trust_remote_code: bool = False
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None


class ProxyVSection(Section):
    start_layer: int = Field(ge=0)
    reduce_factor: int = Field(default=4, ge=1)
    vision_mlp: Literal["residual"] = "residual"
    proxy: Literal["spatial", "learned"] = "spatial"
    learned_proxies: int | None = Field(default=None, ge=1)


class Columns(Section):
    """Column names of a dataset; `prompt`/`answer` of None are detected from common names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = "image"
    prompt: str | None = None
    answer: str | None = None


class DistillSettings(Section):
    """How `proxyv distill` trains (everything but the data)."""

    steps: int = Field(default=300, ge=1)
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_length: int = Field(default=2048, ge=1)
    hidden_loss: Literal["relative", "mse", "cosine"] = "relative"
    vision_weight: float = Field(default=1.0, ge=0)
    text_weight: float = Field(default=1.0, ge=0)
    kl_weight: float = Field(default=1.0, ge=0)
    checkpoint_every: int = Field(default=50, ge=1)
    gradient_accumulation: int = Field(default=1, ge=1)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "validation"
    eval_examples: int = Field(default=200, ge=1)


class DistillSection(DistillSettings):
    data: str
    data_revision: str | None = None
    columns: Columns = Columns()

    def settings(self) -> DistillSettings:
        return DistillSettings(**self.model_dump(include=set(DistillSettings.model_fields)))


class EvalSection(Section):
    data: str = "shapes"
    data_revision: str | None = None
    split: str = "test"
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=50, ge=1)
    against_original: bool = False
    columns: Columns = Columns()


class BenchSection(Section):
    batch_sizes: list[int] = Field(default=[1], min_length=1)
    images: list[int] = Field(default=[1], min_length=1)
    text_tokens: int = Field(default=64, ge=1)
    repeats: int = Field(default=10, ge=1)
    warmup: int = Field(default=3, ge=0)
    compile: bool = False
    cuda_graph: bool = False
    device: str | None = None
    dtype: Dtype = "auto"
    attn: Literal["sdpa", "eager"] = "sdpa"


class PushSection(Section):
    repo_id: str
    private: bool = False
    revision: str | None = None
    create_pr: bool = False


class Recipe(Section):
    output: str | None = Field(default=None, description="model folder the run writes")
    model: ModelSection
    proxyv: ProxyVSection
    distill: DistillSection | None = None
    eval: EvalSection | None = None
    bench: BenchSection | None = None
    push: PushSection | None = None
    provenance: dict[str, Any] | None = None  # written into model folders; informative only

    def stages(self) -> list[str]:
        """The stages this recipe runs, in order."""
        return ["convert", *(s for s in STAGES[1:] if getattr(self, s) is not None)]


def default(section: type[Section], name: str) -> Any:
    """The default of a section's field: what a command-line option defaults to."""
    value = section.model_fields[name].get_default(call_default_factory=True)
    return list(value) if isinstance(value, list) else value


def build(section: type[Section], values: dict[str, Any]) -> Section:
    """A section from command-line values; a bad value is a ProxyVError that names its option."""
    try:
        return section(**values)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-") if first["loc"] else "an option"
        raise ProxyVError(f"{option}: {first['msg']} (got {first.get('input')!r})") from None


# --- recipe files ---------------------------------------------------------------------------------------------------


def builtin_models() -> dict[str, Path]:
    """Models that ship with proxyv, by the name recipes use after `builtin:`."""
    from .shapes import MODEL_DIR

    return {"llava-shapes": MODEL_DIR}


def resolve_model_source(source: str) -> str:
    """A recipe's model source as `convert` takes it: `builtin:NAME` becomes the shipped folder."""
    if not source.startswith(BUILTIN_PREFIX):
        return source
    name = source.removeprefix(BUILTIN_PREFIX)
    models = builtin_models()
    if name not in models:
        raise ProxyVError(f"unknown built-in model '{name}'; built-in models: {', '.join(models)}")
    return str(models[name])


def recipes_dir() -> Path:
    """The `recipes/` folder of a source checkout (or an editable install) of proxyv."""
    return Path(__file__).resolve().parent.parent / "recipes"


def shipped_recipes() -> dict[str, Path]:
    folder = recipes_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def recipe_path(name_or_path: str | Path) -> Path:
    """A recipe file from a path or the name of a shipped recipe."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    names = ", ".join(shipped) or "none found"
    raise ProxyVError(f"recipe {name_or_path} is neither a file nor a shipped recipe (shipped: {names})")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` sets data["a"]["b"] to the YAML value of `value` (sections are created as needed)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ProxyVError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        *parents, last = key.split(".")
        target = data
        for part in parents:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise ProxyVError(f"override '{item}': '{part}' is not a section")
            target = node
        target[last] = value
    return data


def parse_recipe(data: dict[str, Any], origin: str) -> Recipe:
    """Validate a recipe mapping; errors name the key and say what was expected."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; `proxyv recipes show` lists the sections)"
        more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
        raise ProxyVError(f"{origin}: {where}: {message}{more}") from None


def load_recipe(name_or_path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, Path]:
    """(validated recipe, its file) from a path or a shipped recipe's name, with `key=value` overrides applied."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ProxyVError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ProxyVError(f"{path} must hold a mapping of sections (model, proxyv, ...)")
    return parse_recipe(apply_overrides(data, overrides or []), str(path)), path


def check_against_model(recipe: Recipe, origin: str) -> str:
    """Check the start layer and reduce factor against the model's configuration when it can be read (a local or
    built-in folder, or the Hub); returns what was checked, for the user."""
    from .families import FAMILIES

    config_file = _source_config(recipe.model)
    if config_file is None:
        return "the model's configuration could not be read (offline?); layer and factor not checked"
    from transformers import AutoConfig

    llava = AutoConfig.from_pretrained(config_file.parent, trust_remote_code=recipe.model.trust_remote_code)
    if llava.model_type not in FAMILIES:
        raise ProxyVError(f"{origin}: model.source is a '{llava.model_type}' model; proxyv converts "
                          f"{', '.join(FAMILIES)}")
    try:
        FAMILIES[llava.model_type].config.from_llava_config(
            llava, proxyv_start_layer=recipe.proxyv.start_layer, proxyv_reduce_factor=recipe.proxyv.reduce_factor,
            proxyv_proxy=recipe.proxyv.proxy, proxyv_learned_proxies=recipe.proxyv.learned_proxies,
        )
    except (ValueError, TypeError) as error:
        raise ProxyVError(f"{origin}: proxyv: {error}") from None
    return f"checked against {recipe.model.source}'s configuration"


def _source_config(model: ModelSection) -> Path | None:
    source = resolve_model_source(model.source)
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ProxyVError(f"model.source {source} has no config.json")
        return local / "config.json"
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(source, "config.json", revision=model.revision))
    except Exception:  # noqa: BLE001 - offline, gated, missing: validation of the rest still stands
        return None


def dump(recipe: Recipe) -> str:
    """The recipe as YAML (unset optional sections left out)."""
    return yaml.safe_dump(json.loads(recipe.model_dump_json(exclude_none=True)), sort_keys=False)


# --- the recipe.yaml of a model folder ------------------------------------------------------------------------------
# `convert` writes `model`, `proxyv` and `provenance`; later steps (distill, eval, bench, push) add their own section
# and their command, and write it back. Sections are always written in `SECTIONS` order, so the file reads like the
# pipeline, and a header comment gives the exact commands that produced it.


def provenance() -> dict[str, str]:
    """Versions and time of the current run."""
    import torch
    import transformers

    return {
        "proxyv_version": __version__,
        "transformers_version": str(transformers.__version__),
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def dump_recipe(sections: dict[str, dict[str, Any]], commands: list[str]) -> str:
    """YAML text of a recipe: one header comment line per command, then the sections in pipeline order."""
    unknown = set(sections) - set(SECTIONS)
    assert not unknown, f"unknown recipe sections {sorted(unknown)}; known: {SECTIONS}"
    header = "".join(f"# {command}\n" for command in commands)
    ordered = {name: sections[name] for name in SECTIONS if name in sections}
    return header + yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)


def write_recipe(folder: Path, sections: dict[str, dict[str, Any]], commands: list[str]) -> Path:
    path = Path(folder) / RECIPE_FILE
    path.write_text(dump_recipe(sections, commands))
    return path


def read_recipe(folder: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(sections, header commands) of a model folder's recipe."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        raise ProxyVError(f"{folder} has no {RECIPE_FILE}; is it a folder written by `proxyv convert`?")
    text = path.read_text()
    try:
        sections = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ProxyVError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    commands = [line[2:] for line in itertools.takewhile(lambda line: line.startswith("# "), text.splitlines())]
    return sections, commands
