"""Recipe files: one YAML that holds a whole run (`proxyv run RECIPE`), validated before anything runs.

    # proxyv run recipes/llava-1.5-7b.yaml
    output: ./llava-1.5-7b-proxyv-l12
    model: {source: llava-hf/llava-1.5-7b-hf, dtype: bfloat16}
    proxyv: {start_layer: 12, reduce_factor: 4}
    distill: {data: ..., steps: 500}
    eval: {data: ..., split: test}
    bench: {batch_sizes: [1, 8]}
    push: {repo_id: me/llava-1.5-7b-proxyv-l12}

Unknown keys are errors; `key.sub=value` overrides (values parsed as YAML) apply before validation. The model folder's
`recipe.yaml` (written by the stages as they run) has the same sections plus `provenance`, so it validates too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .distill import DistillSettings
from .errors import ProxyVError

BUILTIN_PREFIX = "builtin:"
STAGES = ("convert", "distill", "eval", "bench", "push")
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


class ColumnsSection(Section):
    image: str = "image"
    prompt: str | None = None
    answer: str | None = None


_DISTILL_DEFAULTS = DistillSettings()


class DistillSection(Section):
    data: str
    data_revision: str | None = None
    columns: ColumnsSection | None = None
    steps: int = Field(default=_DISTILL_DEFAULTS.steps, ge=1)
    batch_size: int = Field(default=_DISTILL_DEFAULTS.batch_size, ge=1)
    lr: float = Field(default=_DISTILL_DEFAULTS.lr, gt=0)
    weight_decay: float = Field(default=_DISTILL_DEFAULTS.weight_decay, ge=0)
    warmup_steps: int = Field(default=_DISTILL_DEFAULTS.warmup_steps, ge=0)
    max_grad_norm: float = Field(default=_DISTILL_DEFAULTS.max_grad_norm, gt=0)
    max_length: int = Field(default=_DISTILL_DEFAULTS.max_length, ge=1)
    hidden_loss: Literal["relative", "mse", "cosine"] = _DISTILL_DEFAULTS.hidden_loss
    vision_weight: float = Field(default=_DISTILL_DEFAULTS.vision_weight, ge=0)
    text_weight: float = Field(default=_DISTILL_DEFAULTS.text_weight, ge=0)
    kl_weight: float = Field(default=_DISTILL_DEFAULTS.kl_weight, ge=0)
    checkpoint_every: int = Field(default=_DISTILL_DEFAULTS.checkpoint_every, ge=1)
    gradient_accumulation: int = Field(default=_DISTILL_DEFAULTS.gradient_accumulation, ge=1)
    gradient_checkpointing: bool = _DISTILL_DEFAULTS.gradient_checkpointing
    mixed_precision: Literal["no", "bf16", "fp16"] = _DISTILL_DEFAULTS.mixed_precision
    seed: int = _DISTILL_DEFAULTS.seed
    train_split: str = _DISTILL_DEFAULTS.train_split
    eval_split: str = _DISTILL_DEFAULTS.eval_split
    eval_examples: int = Field(default=_DISTILL_DEFAULTS.eval_examples, ge=1)

    def settings(self) -> DistillSettings:
        names = {f.name for f in dataclasses.fields(DistillSettings)}
        return DistillSettings(**{k: v for k, v in self.model_dump().items() if k in names})


class EvalSection(Section):
    data: str = "shapes"
    split: str = "test"
    limit: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=50, ge=1)
    against_original: bool = True
    columns: ColumnsSection | None = None


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


# --- loading --------------------------------------------------------------------------------------------------------


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
    from .modeling import FAMILIES

    config_file = _source_config(recipe.model)
    if config_file is None:
        return "the model's configuration could not be read (offline?); layer and factor not checked"
    from transformers import AutoConfig

    llava = AutoConfig.from_pretrained(config_file.parent, trust_remote_code=recipe.model.trust_remote_code)
    if llava.model_type not in FAMILIES:
        raise ProxyVError(f"{origin}: model.source is a '{llava.model_type}' model; proxyv converts "
                          f"{', '.join(FAMILIES)}")
    try:
        FAMILIES[llava.model_type][0].from_llava_config(
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
