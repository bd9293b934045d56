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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from . import __version__
from .errors import ProxyVError

BUILTIN_PREFIX = "builtin:"
STAGES = ("convert", "distill", "eval", "bench", "push")
RECIPE_FILE = "recipe.yaml"
SECTIONS = ("model", "proxyv", "distill", "eval", "bench", "push", "provenance")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# Sanity bounds: far above any real run, low enough that a typo (an extra zero, 1e29, inf) is refused up front
# instead of running out of memory or time hours later.
MAX_STEPS = 10_000_000  # optimizer steps, checkpoint interval, warm-up
MAX_DISTILL_BATCH = 4096  # examples per micro-batch (distill) and per generate call (eval)
MAX_ACCUMULATION = 1024  # micro-batches per optimizer step
MAX_LENGTH = 1_048_576  # tokens per training sequence
MAX_EXAMPLES = 1_000_000  # held-out / evaluated examples
MAX_LR = 1.0
MAX_LOSS_WEIGHT = 1000.0  # each term of the distillation loss
MAX_GRAD_NORM = 1e6
MAX_SEED = 2**32 - 1
MAX_LAYER = 10_000
MAX_REDUCE_FACTOR = 1024
MAX_LEARNED_PROXIES = 65_536  # per image grid; the model's check also caps them at the grid's token count
MAX_VIDEO_FRAMES = 4096  # frames per video proxy group
MAX_BENCH_BATCH = 1024
MAX_BENCH_IMAGES = 64  # images per prompt
MAX_BENCH_VALUES = 64  # values in one list option (batch sizes, images)
MAX_TEXT_TOKENS = 65_536
MAX_REPEATS = 10_000


class Section(BaseModel):
    # allow_inf_nan=False: every float of every section (learning rate, loss weights, ...) must be finite
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(Section):
    source: str = Field(description="Hub id, local folder, or builtin:NAME")
    revision: str | None = None
    dtype: Dtype = "auto"
    trust_remote_code: bool = False
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None


class ProxyVSection(Section):
    start_layer: int = Field(ge=0, le=MAX_LAYER)
    reduce_factor: int = Field(default=4, ge=1, le=MAX_REDUCE_FACTOR)
    vision_mlp: Literal["residual"] = "residual"
    proxy: Literal["spatial", "learned"] = "spatial"
    learned_proxies: int | None = Field(default=None, ge=1, le=MAX_LEARNED_PROXIES)
    video_frames: int = Field(default=1, ge=1, le=MAX_VIDEO_FRAMES)  # frames per video proxy group (1: per frame)


class Columns(Section):
    """Column names of a dataset; `prompt`/`answer`/`video` of None are detected from common names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = "image"
    prompt: str | None = None
    answer: str | None = None
    video: str | None = None  # a video per row: a list of frames (images) or a video file


class DistillSettings(Section):
    """How `proxyv distill` trains (everything but the data)."""

    steps: int = Field(default=300, ge=1, le=MAX_STEPS)
    batch_size: int = Field(default=8, ge=1, le=MAX_DISTILL_BATCH)
    lr: float = Field(default=3e-3, gt=0, le=MAX_LR)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=10, ge=0, le=MAX_STEPS)
    max_grad_norm: float = Field(default=1.0, gt=0, le=MAX_GRAD_NORM)
    max_length: int = Field(default=2048, ge=1, le=MAX_LENGTH)
    hidden_loss: Literal["relative", "mse", "cosine"] = "relative"
    vision_weight: float = Field(default=1.0, ge=0, le=MAX_LOSS_WEIGHT)
    text_weight: float = Field(default=1.0, ge=0, le=MAX_LOSS_WEIGHT)
    kl_weight: float = Field(default=1.0, ge=0, le=MAX_LOSS_WEIGHT)
    checkpoint_every: int = Field(default=50, ge=1, le=MAX_STEPS)
    gradient_accumulation: int = Field(default=1, ge=1, le=MAX_ACCUMULATION)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    train_split: str = "train"
    eval_split: str = "validation"
    eval_examples: int = Field(default=200, ge=1, le=MAX_EXAMPLES)

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_steps(cls, value: int, info: ValidationInfo) -> int:
        # the default warm-up may exceed a short run's steps (it is then cut short); a chosen one may not
        steps = info.data.get("steps")
        if steps is not None and value > steps and value != cls.model_fields["warmup_steps"].default:
            raise PydanticCustomError("warmup_too_long", "must not exceed steps ({steps})", {"steps": steps})
        return value

    @field_validator("kl_weight")
    @classmethod
    def _some_loss(cls, value: float, info: ValidationInfo) -> float:
        if value == 0 and info.data.get("vision_weight") == 0 and info.data.get("text_weight") == 0:
            raise PydanticCustomError(
                "no_loss", "the vision, text and KL weights are all 0, so nothing would be learned; keep one above 0",
            )
        return value


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
    limit: int | None = Field(default=None, ge=1, le=MAX_EXAMPLES)
    batch_size: int = Field(default=50, ge=1, le=MAX_DISTILL_BATCH)
    against_original: bool = False
    columns: Columns = Columns()


class BenchSection(Section):
    batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BENCH_BATCH)]] = Field(
        default=[1], min_length=1, max_length=MAX_BENCH_VALUES)
    images: list[Annotated[int, Field(ge=1, le=MAX_BENCH_IMAGES)]] = Field(
        default=[1], min_length=1, max_length=MAX_BENCH_VALUES)
    text_tokens: int = Field(default=64, ge=1, le=MAX_TEXT_TOKENS)
    repeats: int = Field(default=10, ge=1, le=MAX_REPEATS)
    warmup: int = Field(default=3, ge=0, le=MAX_REPEATS)
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
        got = repr(first.get("input"))
        got = got if len(got) <= 80 else got[:77] + "..."  # one line, whatever was given
        raise ProxyVError(f"{option}: {first['msg']} (got {got})") from None


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
    data = _load_yaml(path)
    if not isinstance(data, dict):
        raise ProxyVError(f"{path} must hold a mapping of sections (model, proxyv, ...)")
    return parse_recipe(apply_overrides(data, overrides or []), str(path)), path


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ProxyVError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ProxyVError(f"{path} could not be read ({error.strerror or error})") from None


def _load_yaml(path: Path) -> Any:
    """The YAML document of a file; ProxyVError for text that is not UTF-8, not YAML, or nested too deeply."""
    text = _read_text(path)
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ProxyVError(f"{path} is not valid YAML ({first})") from None
    except RecursionError:
        raise ProxyVError(f"{path} nests too deeply to be a recipe") from None


def read_config_json(config_path: Path) -> dict[str, Any]:
    """A model's config.json as a mapping, with the JSON types of the keys read before transformers parses it (a
    list where a mapping belongs would otherwise fail deep inside transformers); ProxyVError otherwise."""
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8 or JSON, hostile nesting
        raise ProxyVError(f"{config_path} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, dict):
        raise ProxyVError(f"{config_path} must hold a JSON object (the model's configuration), not a "
                          f"{type(raw).__name__}")
    expected = {"model_type": str, "auto_map": dict, "text_config": dict, "vision_config": dict}
    for key, kind in expected.items():
        if raw.get(key) is not None and not isinstance(raw[key], kind):
            raise ProxyVError(f"{config_path}: '{key}' must be a JSON {'string' if kind is str else 'object'}, "
                              f"not {str(raw[key])[:60]!r}; the configuration is damaged")
    return raw


# Sizes that conversion divides by or builds (meta) tensors from: each must be a positive integer.
POSITIVE_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "image_size", "patch_size")


def load_model_config(config_path: Path, *, trust_remote_code: bool) -> Any:
    """transformers' configuration object of a model folder's config.json, with its sizes checked; ProxyVError,
    never a traceback, when the file is damaged."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(config_path.parent, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers fails in many ways on a damaged config: the user's file
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise ProxyVError(f"{config_path} could not be read as a model configuration ({message[:300]})") from None
    for part in ("text_config", "vision_config"):
        sub = getattr(config, part, None)
        for key in POSITIVE_SIZES:
            value = getattr(sub, key, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                             for v in values):
                raise ProxyVError(f"{config_path}: {part}.{key} must be a positive integer, got {str(value)[:40]}")
    return config


def check_against_model(recipe: Recipe, origin: str) -> str:
    """Check the start layer and reduce factor against the model's configuration when it can be read (a local or
    built-in folder, or the Hub); returns what was checked, for the user."""
    from .families import FAMILIES

    config_file = _source_config(recipe.model)
    if config_file is None:
        return "the model's configuration could not be read (offline?); layer and factor not checked"
    # the same checks as `convert`: a damaged config.json is a one-line error, not a traceback
    read_config_json(config_file)
    llava = load_model_config(config_file, trust_remote_code=recipe.model.trust_remote_code)
    if llava.model_type not in FAMILIES:
        raise ProxyVError(f"{origin}: model.source is a '{llava.model_type}' model; proxyv converts "
                          f"{', '.join(FAMILIES)}")
    try:
        family = FAMILIES[llava.model_type]
        family.config.from_llava_config(
            llava, proxyv_start_layer=recipe.proxyv.start_layer, proxyv_reduce_factor=recipe.proxyv.reduce_factor,
            proxyv_proxy=recipe.proxyv.proxy, proxyv_learned_proxies=recipe.proxyv.learned_proxies,
            **family.video_settings(recipe.proxyv.video_frames),
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
    text = _read_text(path)
    sections = _load_yaml(path)
    if not isinstance(sections, dict):
        raise ProxyVError(f"{path} must hold a mapping of sections (model, proxyv, ...); it is damaged")
    commands = [line[2:] for line in itertools.takewhile(lambda line: line.startswith("# "), text.splitlines())]
    return sections, commands
