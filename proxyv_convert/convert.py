"""`proxyv convert`: turn a LLaVA checkpoint into a ProxyV checkpoint, streaming tensors from disk to disk.

The output holds the original tensors unchanged (bit-for-bit, unless --dtype casts them) under the native state_dict
names of the family's ProxyV model, plus freshly initialised ProxyV tensors (`model.proxyv.*`), the
config with `auto_map`, the model code, the source's processor and tokenizer files, and the resolved recipe.
Peak memory is the Python/torch baseline plus a few MB: tensors are copied (or cast) in chunks, ProxyV modules are
initialised one layer at a time, and the model itself only ever exists on the meta device.
Every check runs before anything is written, and the output folder appears atomically.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shlex
import shutil
import sys
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from transformers import LlavaConfig, PretrainedConfig, PreTrainedModel
from transformers.utils.hub import convert_file_size_to_int

from .atomic import atomic_output, check_output
from .config import Dtype, provenance, write_recipe
from .errors import ProxyVError
from .families import FAMILIES, Family, family_of
from .model_folder import PROXYV_PREFIX, canonical_code
from .remote.modeling_proxyv import init_proxyv_module
from .safetensors_stream import (
    FLOAT_DTYPES,
    OutputTensor,
    TensorInfo,
    copy_bytes,
    read_checkpoint,
    read_chunks,
    write_checkpoint,
)
from .source import Source, fetch_weights, processor_files, read_llava_config, resolve_source, source_license
from .weights import TORCH_DTYPES

DTYPE_CHOICES = typing.get_args(Dtype)
DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
DEFAULT_MAX_SHARD_SIZE = "5GB"  # as transformers' save_pretrained
INIT_SEED = 0
PROXYV_FILE = "model-proxyv.safetensors"  # the ProxyV tensors, in a file of their own that distillation replaces

# Buffers that old checkpoints stored and current models recompute (transformers ignores them on load too).
STALE_BUFFERS = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$")


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote."""

    out: Path
    source: str
    tensors_copied: int
    tensors_added: int
    bytes_written: int
    parameters: int  # of the original model
    parameters_added: int  # by ProxyV
    files: tuple[str, ...]  # weight files written
    seconds: float


def convert(
    source: str,
    out: str | Path,
    *,
    layer: int,
    reduce_factor: int = 4,
    dtype: str = "auto",
    overwrite: bool = False,
    revision: str | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    proxy: str = "spatial",
    learned_proxies: int | None = None,
    video_frames: int = 1,
) -> ConvertResult:
    """Convert the LLaVA checkpoint `source` (local folder or Hub id) into a ProxyV checkpoint in `out`.

    ProxyV runs from decoder layer `layer` on, with proxies made by downsampling each image grid by `reduce_factor`
    (`proxy="spatial"`) or by `learned_proxies` learned queries per image grid (`proxy="learned"`); a video's proxies
    are made per group of `video_frames` neighbouring frames (families with video).
    `dtype` "auto" keeps every tensor's dtype; otherwise floating tensors are cast. Raises ProxyVError, before
    writing anything, on bad input.
    """
    started = time.perf_counter()
    out = Path(out)
    if dtype not in DTYPE_CHOICES:
        raise ProxyVError(f"--dtype {dtype} is not one of {', '.join(DTYPE_CHOICES)}")
    check_output(out, overwrite=overwrite)  # fail before downloading anything
    src = resolve_source(source, revision=revision, trust_remote_code=trust_remote_code)
    check_output(out, overwrite=overwrite, source=src.path)
    config = proxyv_config(
        src, read_llava_config(src, trust_remote_code=trust_remote_code), layer, reduce_factor, proxy, learned_proxies,
        video_frames,
    )
    fetch_weights(src)
    weights = source_weights(src)
    family = family_of(config)
    with torch.device("meta"):
        model = family.head(config)
    matched = match_weights(src.name, weights, model, family.key_rules)
    float_code = DTYPE_CODES[dtype] if dtype != "auto" else dominant_float_dtype(weights.values())
    if dtype != "auto":
        config.dtype = dtype
    tensors = [copied_tensor(name, info, None if dtype == "auto" else float_code) for name, info in matched.items()]
    added = proxyv_tensors(model, float_code)
    command = convert_command(source, out, layer, reduce_factor, dtype, revision, trust_remote_code, proxy,
                              learned_proxies, video_frames)
    total = sum(t.nbytes for t in tensors + added)
    with atomic_output(out, overwrite=overwrite) as tmp, _progress(total, progress) as bar:
        files = write_checkpoint(
            tmp, tensors, convert_file_size_to_int(max_shard_size), bar.update, own_file=(PROXYV_FILE, added)
        )
        write_folder_files(tmp, src, config, DTYPE_NAMES[float_code], command)
    return ConvertResult(
        out=out,
        source=src.name,
        tensors_copied=len(tensors),
        tensors_added=len(added),
        bytes_written=total,
        parameters=sum(info.numel for info in matched.values()),
        parameters_added=sum(math.prod(t.shape) for t in added),
        files=tuple(files),
        seconds=time.perf_counter() - started,
    )


def proxyv_config(src: Source, llava: LlavaConfig, layer: int, reduce_factor: int, proxy: str = "spatial",
                  learned_proxies: int | None = None, video_frames: int = 1) -> PretrainedConfig:
    family = FAMILIES[llava.model_type]
    try:
        config = family.config.from_llava_config(
            llava, proxyv_start_layer=layer, proxyv_reduce_factor=reduce_factor, proxyv_base_model=src.name,
            proxyv_proxy=proxy, proxyv_learned_proxies=learned_proxies, **family.video_settings(video_frames),
        )
    except ValueError as e:
        raise ProxyVError(f"cannot convert {src.name}: {e}") from None
    config.auto_map = family.auto_map()
    config.architectures = [family.head.__name__]
    return config


def source_weights(src: Source) -> dict[str, TensorInfo]:
    weights = read_checkpoint(src.path)
    if not weights:
        found = sorted(p.name for p in src.path.glob("*.bin"))
        also = f" (found {', '.join(found)}: re-save it with save_pretrained to get safetensors)" if found else ""
        raise ProxyVError(f"{src.name} has no safetensors weights; proxyv reads safetensors checkpoints only{also}")
    return weights


def target_name(key: str, vision: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """The native name of a source checkpoint key under a family's key rules, or None when no rule applies."""
    for pattern, replacement in rules:
        if re.match(pattern, key):
            return re.sub(pattern, replacement.replace("{vision}", vision), key, count=1)
    return None


def match_weights(
    source: str, weights: dict[str, TensorInfo], model: PreTrainedModel,
    rules: tuple[tuple[str, str], ...],
) -> dict[str, TensorInfo]:
    """{native name: source tensor} for every parameter of `model` except the ProxyV ones and absent tied weights.

    The mapping must be exact: same key count, shape and kind of dtype on both sides; anything else means the
    checkpoint does not belong to its config (or to a layout we know), and converting it would silently drop, invent
    or garble weights (an I32 tensor where a float weight belongs has the right byte size but wrong values).
    """
    state = model.state_dict()
    expected = {name: tuple(t.shape) for name, t in state.items()}
    vision = "vision_model." if any(k.startswith("model.vision_tower.vision_model.") for k in expected) else ""
    eight_bit = getattr(model.config, "quantization_config", None) is not None  # FP8 checkpoints store F8 weights
    matched: dict[str, TensorInfo] = {}
    unexpected, mismatched, wrong_dtype = [], [], []
    found: set[str] = set()  # model tensors with a source tensor, matching or not (those are not "missing")
    for key, info in weights.items():
        name = target_name(key, vision, rules)
        if name not in expected and STALE_BUFFERS.search(key):
            continue
        if name not in expected or name in found:
            unexpected.append(key)
            continue
        found.add(name)
        if info.dtype not in (kinds := source_dtypes(state[name].dtype, eight_bit)):
            # before the shape: a lying dtype often comes with a shape made to fit the bytes (I16 at twice the size)
            wrong_dtype.append(f"{key} is {info.dtype}, expected {'/'.join(kinds) or state[name].dtype}")
        elif info.shape != expected[name]:
            mismatched.append(f"{key} is {list(info.shape)}, expected {list(expected[name])}")
        else:
            matched[name] = info
    may_be_absent = set(model.all_tied_weights_keys)
    missing = [n for n in expected if n not in found and not n.startswith(PROXYV_PREFIX) and n not in may_be_absent]
    problems = [
        f"{len(group)} {what} ({', '.join(group[:3])}{', ...' if len(group) > 3 else ''})"
        for what, group in (
            ("unexpected tensors", unexpected),
            ("missing tensors", missing),
            ("shapes differ", mismatched),
            ("dtypes differ", wrong_dtype),
        )
        if group
    ]
    if problems:
        raise ProxyVError(f"the weights of {source} do not match its config: {'; '.join(problems)}")
    proxyv = [n for n in expected if n.startswith(PROXYV_PREFIX)]
    absent_tied = [n for n in may_be_absent if n not in matched]
    assert len(matched) + len(proxyv) + len(absent_tied) == len(expected), "every model tensor is accounted for once"
    return matched


EIGHT_BIT_FLOATS = ("F8_E4M3", "F8_E5M2")
INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8")


def source_dtypes(dtype: torch.dtype, eight_bit: bool = False) -> tuple[str, ...]:
    """The safetensors dtypes a source tensor may have for a model tensor of `dtype`: a floating parameter comes from
    a floating tensor (8-bit floats only in a quantised checkpoint), an integer buffer from an integer one, a boolean
    from BOOL. Copying bytes of another kind would load as garbage of the right size."""
    if dtype.is_floating_point:
        return FLOAT_DTYPES + (EIGHT_BIT_FLOATS if eight_bit else ())
    if dtype == torch.bool:
        return ("BOOL",)
    if not dtype.is_complex:
        return INTEGER_DTYPES
    return ()


def dominant_float_dtype(weights: Iterable[TensorInfo]) -> str:
    """The floating dtype holding most of the checkpoint's elements: the dtype new tensors get with --dtype auto."""
    counts: Counter[str] = Counter()
    for info in weights:
        if info.dtype in FLOAT_DTYPES:
            counts[info.dtype] += info.numel
    if not counts:
        raise ProxyVError("the checkpoint has no floating-point tensors; pass --dtype to choose one")
    return counts.most_common(1)[0][0]


def copied_tensor(name: str, info: TensorInfo, cast_to: str | None) -> OutputTensor:
    """A source tensor under its native name: raw bytes copied, or (for floating tensors) cast to `cast_to`."""
    if cast_to is None or info.dtype not in FLOAT_DTYPES or info.dtype == cast_to:
        return OutputTensor(name, info.dtype, info.shape, copy_bytes(info))

    def write(out: BinaryIO) -> None:
        for chunk in read_chunks(info):  # casting is elementwise, so it streams like a copy
            out.write(_raw(torch.frombuffer(chunk, dtype=TORCH_DTYPES[info.dtype]).to(TORCH_DTYPES[cast_to])))

    return OutputTensor(name, cast_to, info.shape, write)


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor without copying them (little-endian, as safetensors stores them)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def proxyv_tensors(model: PreTrainedModel, dtype: str) -> list[OutputTensor]:
    """Output tensors for the ProxyV parameters of a meta-device model, initialised one VisionMLP at a time.

    The values equal `torch.manual_seed(INIT_SEED); ProxyVModules(config).reset_parameters(std)` (one RNG stream,
    layer by layer, cast to `dtype`) while only one layer is ever materialised. The writers must run in order.
    """
    modules = model.model.proxyv
    known = ("vision_mlps.", "learned.")
    assert all(n.startswith(known) for n, _ in modules.named_parameters()), "initialise new modules here"
    std = model.config.text_config.initializer_range
    stream = _initialised_parameters(modules, std, TORCH_DTYPES[dtype])

    def writer(expected: str) -> Callable[[BinaryIO], None]:
        def write(out: BinaryIO) -> None:
            name, tensor = next(stream)
            assert name == expected, f"ProxyV tensors must be written in order: got {name}, expected {expected}"
            out.write(_raw(tensor))

        return write

    return [
        OutputTensor(PROXYV_PREFIX + name, dtype, tuple(p.shape), writer(PROXYV_PREFIX + name))
        for name, p in modules.named_parameters()
    ]


def _initialised_parameters(modules: torch.nn.Module, std: float, dtype: torch.dtype) -> Iterator:
    """(native name, tensor) of every ProxyV parameter, layer by layer, then the learned-proxy module (if any).

    All VisionMLPs have the same shapes, so one module on the CPU is reset in place for each layer in turn and cast
    into the same output buffers: memory stays at one layer, with no allocations for the allocator to fragment
    (fresh buffers per layer made peak RSS grow with the layer count). A yielded tensor is valid until the next
    layer starts.
    """
    vision_mlps = modules.vision_mlps
    layer = copy.deepcopy(next(iter(vision_mlps.values()))).to_empty(device="cpu")
    shapes = {name: p.shape for name, p in layer.named_parameters()}
    outputs = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    generator_state = torch.Generator().manual_seed(INIT_SEED).get_state()
    for index, mlp in vision_mlps.items():
        assert {name: p.shape for name, p in mlp.named_parameters()} == shapes, "VisionMLPs differ in shape"
        with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
            torch.random.set_rng_state(generator_state)
            layer.reset_parameters(std)
            generator_state = torch.random.get_rng_state()
        for name, param in layer.named_parameters():
            yield f"{PROXYV_PREFIX}vision_mlps.{index}.{name}", outputs[name].copy_(param.detach())
    if hasattr(modules, "learned"):  # small: materialised whole, after the VisionMLPs in the same RNG stream
        learned = copy.deepcopy(modules.learned).to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.random.set_rng_state(generator_state)
            for module in learned.modules():
                init_proxyv_module(module, std)
        for name, param in learned.named_parameters():
            yield f"{PROXYV_PREFIX}learned.{name}", param.detach().to(dtype)


def convert_command(
    source: str, out: Path, layer: int, reduce_factor: int, dtype: str, revision: str | None, trust_remote_code: bool,
    proxy: str = "spatial", learned_proxies: int | None = None, video_frames: int = 1,
) -> str:
    """The CLI command equivalent to a `convert` call (the recipe's header)."""
    args = ["proxyv", "convert", source, "--layer", str(layer), "--reduce-factor", str(reduce_factor)]
    args += ["--proxy", proxy] if proxy != "spatial" else []
    args += ["--learned-proxies", str(learned_proxies)] if learned_proxies is not None else []
    args += ["--video-frames", str(video_frames)] if video_frames != 1 else []
    args += ["--dtype", dtype, "--out", str(out)]
    args += ["--revision", revision] if revision else []
    args += ["--trust-remote-code"] if trust_remote_code else []
    return shlex.join(args)


def write_folder_files(folder: Path, src: Source, config: PretrainedConfig, dtype: str, command: str) -> None:
    """Everything but the weights: config, model code, processor/tokenizer files, recipe."""
    config.to_json_file(folder / "config.json")
    for name, data in canonical_code().items():
        (folder / name).write_bytes(data)
    for relative in processor_files(src.path):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.path / relative, folder / relative)
    add_processor_auto_map(folder, family_of(config))
    sections = {
        "model": {"source": src.name, "revision": src.revision, "dtype": dtype, **source_license(src.path)},
        "proxyv": {
            "start_layer": config.proxyv_start_layer,
            "reduce_factor": config.proxyv_reduce_factor,
            "vision_mlp": config.proxyv_vision_mlp,
            "proxy": config.proxyv_proxy,
            **({"learned_proxies": config.proxyv_learned_proxies} if config.proxyv_proxy == "learned" else {}),
            **({"video_frames": config.proxyv_video_frames} if getattr(config, "proxyv_video_frames", 1) != 1 else {}),
        },
        "provenance": provenance(),
    }
    write_recipe(folder, sections, [command])


def add_processor_auto_map(folder: Path, family: Family) -> None:
    """Point `AutoProcessor.from_pretrained(..., trust_remote_code=True)` at the family's ProxyV processor (which loads
    where torchvision does not import), in the processor config where transformers looks for it first; every other
    field of the file is kept."""
    auto_map = family.processor_auto_map()
    path = next((folder / name for name in ("processor_config.json", "preprocessor_config.json")
                 if (folder / name).is_file()), None)
    if not auto_map or path is None:
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ProxyVError(f"the source's {path.name} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ProxyVError(f"the source's {path.name} holds a JSON {type(data).__name__}, not an object")
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    path.write_text(json.dumps(data, indent=2) + "\n")


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="Writing", disable=not enabled, file=sys.stderr
    )
