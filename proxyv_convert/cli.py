"""The `proxyv` command line: a thin Typer layer over the library, one function per command.

Each command makes one library call inside `user_errors()`, which turns a ProxyVError into `error: <message>` on
stderr and its exit code, and Ctrl-C into exit code 130; anything else keeps its traceback. Library modules are
imported inside the commands, so `proxyv --help` and `proxyv --version` start without loading torch.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .config import BenchSection, Columns, DistillSettings, EvalSection, ModelSection, ProxyVSection, default
from .errors import ProxyVError

app = typer.Typer(
    name="proxyv",
    help="Convert LLaVA checkpoints into ProxyV models: much faster image prefill, every vision token kept.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def user_errors(quiet: bool = False) -> Iterator[None]:
    """ProxyVError -> `error: <message>` on stderr and its exit code; Ctrl-C -> exit code 130. `quiet` also silences
    the libraries' own progress bars."""
    try:
        if quiet:
            quiet_libraries()
        yield
    except ProxyVError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted (nothing was left half-written)", err=True)
        raise typer.Exit(130) from None


def quiet_libraries() -> None:
    """--quiet also silences the libraries' own progress bars (weight loading, dataset preparation, transfers)."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # datasets reads this when it is imported (only commands that read a dataset import it)
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    datasets = sys.modules.get("datasets")
    if datasets is not None:  # imported already
        datasets.disable_progress_bars()


RecipeOption = Annotated[
    str | None,
    typer.Option("--recipe", help="Recipe file (or shipped recipe name): options not given here come from it.",
                 show_default=False),
]


def from_recipe(ctx: typer.Context, recipe: str | None, values: dict, mapping: dict[str, str]) -> dict:
    """The command's parameter `values`, with those the user did not give taken from the recipe (`mapping`: parameter
    name -> dotted recipe key), so that a command with --recipe and `proxyv run` agree."""
    if recipe is None:
        return values
    import json

    from .config import load_recipe, resolve_model_source

    loaded, _ = load_recipe(recipe)
    data = json.loads(loaded.model_dump_json())
    data["model"]["source"] = resolve_model_source(loaded.model.source)
    merged = dict(values)
    for name, key in mapping.items():
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):  # given on the command line
            continue
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            merged[name] = node
    return merged


def require(values: dict, **names: str) -> None:
    """ProxyVError for each required value still missing after the recipe: `names` maps parameter -> how to give it."""
    for name, how in names.items():
        if values.get(name) is None:
            raise ProxyVError(f"{how} is required (give it, or a --recipe that sets it)")


ThreadsOption = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads torch computes with (default: one per core). On a CPU shared with "
                 "other work, fewer threads can be much faster.", show_default=False),
]


def use_threads(threads: int | None) -> None:
    from .threads import set_threads

    set_threads(threads)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"proxyv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command(
    epilog="Example: proxyv convert llava-hf/llava-1.5-7b-hf --layer 12 --out ./llava-1.5-7b-proxyv-l12",
)
def convert(
    ctx: typer.Context,
    src: Annotated[
        str | None, typer.Argument(help="LLaVA checkpoint: a local folder or a Hub id.", show_default=False)
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", "-l", help="First decoder layer that runs ProxyV.", show_default=False)
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output folder (must not exist, unless --overwrite).", show_default=False),
    ] = None,
    reduce_factor: Annotated[int, typer.Option(help="Downsample each image's token grid by this factor per side.")] = (
        default(ProxyVSection, "reduce_factor")
    ),
    proxy: Annotated[str, typer.Option(help="spatial (downsample the grid) or learned (learned queries per image).")]
    = default(ProxyVSection, "proxy"),
    learned_proxies: Annotated[int | None, typer.Option(help="Proxies per image grid with --proxy learned "
                                                             "(default: as many as spatial makes).")] = None,
    video_frames: Annotated[int, typer.Option(help="Video proxies per group of this many neighbouring frames (1: per "
                                                   "frame; families with video).")] = default(ProxyVSection,
                                                                                               "video_frames"),
    dtype: Annotated[str, typer.Option(help="auto (keep), float32, bfloat16 or float16.")] = default(
        ModelSection, "dtype"),
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists (once the new folder is complete).")
    ] = False,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit of SRC.")] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow custom code in SRC's config.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    recipe: RecipeOption = None,
) -> None:
    """Insert ProxyV modules into a LLaVA checkpoint and write a ProxyV checkpoint (weights streamed, not loaded)."""
    with user_errors(quiet):
        from .convert import convert as convert_checkpoint

        v = from_recipe(ctx, recipe, locals(), {
            "src": "model.source", "layer": "proxyv.start_layer", "out": "output", "reduce_factor":
            "proxyv.reduce_factor", "dtype": "model.dtype", "revision": "model.revision",
            "trust_remote_code": "model.trust_remote_code", "proxy": "proxyv.proxy",
            "learned_proxies": "proxyv.learned_proxies", "video_frames": "proxyv.video_frames",
        })
        require(v, src="SRC", layer="--layer", out="--out")
        layer, reduce_factor = v["layer"], v["reduce_factor"]
        result = convert_checkpoint(
            v["src"], Path(v["out"]), layer=layer, reduce_factor=reduce_factor, dtype=v["dtype"], overwrite=overwrite,
            revision=v["revision"], trust_remote_code=v["trust_remote_code"], progress=not quiet, proxy=v["proxy"],
            learned_proxies=v["learned_proxies"], video_frames=v["video_frames"],
        )
    typer.echo(
        f"Wrote {result.out}: {result.source} with ProxyV from layer {layer} (reduce factor {reduce_factor}), "
        f"{result.parameters_added:,} new parameters ({result.tensors_added} tensors) beside "
        f"{result.parameters:,} original ones; {_size(result.bytes_written)} in {result.seconds:.1f} s."
    )
    typer.echo(f"Next: proxyv distill {result.out} --data <dataset>")


@app.command(
    epilog="Example: proxyv distill ./llava-1.5-7b-proxyv-l12 --data ./my-vqa --steps 500 --mixed-precision bf16",
)
def distill(
    ctx: typer.Context,
    model: Annotated[
        Path | None, typer.Argument(help="ProxyV model folder (from proxyv convert).", show_default=False)
    ] = None,
    data: Annotated[str | None, typer.Option(help="'shapes', a save_to_disk folder, a parquet/jsonl file, an image "
                                                  "folder or a Hub dataset name.", show_default=False)] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = default(DistillSettings, "steps"),
    batch_size: Annotated[int, typer.Option(help="Examples per process and micro-batch.")] = default(
        DistillSettings, "batch_size"),
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine to 10%).")] = default(
        DistillSettings, "lr"),
    max_length: Annotated[
        int, typer.Option(help="Longest sequence in tokens (the text after the image is cut).")
    ] = default(DistillSettings, "max_length"),
    out: Annotated[Path | None, typer.Option(help="Write the distilled model here instead of in place.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = default(
        DistillSettings, "checkpoint_every"),
    hidden_loss: Annotated[
        str, typer.Option(help="Per-token hidden-state distance: relative, mse or cosine.")
    ] = default(DistillSettings, "hidden_loss"),
    vision_weight: Annotated[float, typer.Option(help="Weight of the hidden-state term on vision tokens.")] = default(
        DistillSettings, "vision_weight"),
    text_weight: Annotated[float, typer.Option(help="Weight of the hidden-state term on text tokens.")] = default(
        DistillSettings, "text_weight"),
    kl_weight: Annotated[float, typer.Option(help="Weight of the KL term on the next-token distributions.")] = default(
        DistillSettings, "kl_weight"),
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = default(DistillSettings, "warmup_steps"),
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = default(DistillSettings, "weight_decay"),
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this value.")] = default(
        DistillSettings, "max_grad_norm"),
    gradient_accumulation: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = default(
        DistillSettings, "gradient_accumulation"),
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                         help="Recompute activations to save memory.")] = default(
        DistillSettings, "gradient_checkpointing"),
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (accelerate autocast).")] = default(
        DistillSettings, "mixed_precision"),
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = default(DistillSettings, "seed"),
    train_split: Annotated[str, typer.Option(help="Split to train on; NAME[a:b] takes rows a..b of it.")] = default(
        DistillSettings, "train_split"),
    eval_split: Annotated[str, typer.Option(help="Held-out split for the before/after report (else the tail of "
                                                  "the train split is held out); NAME[a:b] takes rows a..b.")]
    = default(DistillSettings, "eval_split"),
    eval_examples: Annotated[int, typer.Option(help="Held-out examples in the report.")] = default(
        DistillSettings, "eval_examples"),
    image_column: Annotated[str, typer.Option(help="Column with the images.")] = default(Columns, "image"),
    prompt_column: Annotated[str | None, typer.Option(help="Column with the prompts (default: detected).")] = None,
    answer_column: Annotated[str | None, typer.Option(help="Column with the answers (default: detected).")] = None,
    video_column: Annotated[str | None, typer.Option(
        help="Column with videos: lists of frames or video files (default: a 'video' column, if any).")] = None,
    data_revision: Annotated[str | None, typer.Option(help="Revision of a Hub dataset.")] = None,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    recipe: RecipeOption = None,
) -> None:
    """Train the ProxyV modules to match the same model with ProxyV off; only the ProxyV tensors change."""
    with user_errors(quiet):
        from .config import build
        from .distill import distill as run_distill

        names = list(DistillSettings.model_fields)
        mapping = {name: f"distill.{name}" for name in names}
        mapping.update(model="output", data="distill.data", data_revision="distill.data_revision",
                       image_column="distill.columns.image", prompt_column="distill.columns.prompt",
                       answer_column="distill.columns.answer", video_column="distill.columns.video")
        v = from_recipe(ctx, recipe, locals(), mapping)
        require(v, model="MODEL", data="--data")
        settings = build(DistillSettings, {name: v[name] for name in names})
        use_threads(threads)
        data = v["data"]
        result = run_distill(
            Path(v["model"]), data, settings=settings, out=out, resume=resume, revision=v["data_revision"],
            progress=not quiet,
            columns=Columns(image=v["image_column"], prompt=v["prompt_column"], answer=v["answer_column"],
                            video=v["video_column"]),
        )
    before, after = result.report.get("before", {}), result.report.get("after", {})
    typer.echo(f"Distilled {result.out}: {result.steps} steps in {result.seconds:.0f} s.")
    if "cosine_vision" in before and "cosine_vision" in after:
        typer.echo(f"  hidden-state cosine (vision) {before['cosine_vision']:.4f} -> {after['cosine_vision']:.4f}; "
                   f"next-token agreement {before['top1']:.1%} -> {after['top1']:.1%}")
    if "task" in before and "task" in after:
        typer.echo(f"  answers: teacher {after['task']['teacher_accuracy']:.1%}, student "
                   f"{before['task']['student_accuracy']:.1%} -> {after['task']['student_accuracy']:.1%}, "
                   f"agreement {before['task']['answer_agreement']:.1%} -> {after['task']['answer_agreement']:.1%}")
    typer.echo(f"Report: {result.out / 'distill_report.json'}")
    columns = [(f"--{name}-column", value) for name, value in result.report["columns"].items()
               if value is not None and value != default(Columns, name)]
    typer.echo("Next: " + shlex.join([
        "proxyv", "eval", str(result.out), "--data", str(data), "--split", result.report["held_out_split"],
        *[part for pair in columns for part in pair], "--against-original",
    ]))


@app.command(
    epilog="Example: proxyv push ./llava-1.5-7b-proxyv-l12 --repo-id me/llava-1.5-7b-proxyv-l12",
)
def push(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Argument(help="ProxyV model folder to publish.", show_default=False)] = None,
    repo_id: Annotated[str | None, typer.Option(
        help="Hub repository, e.g. your-name/model-name (created when missing).", show_default=False)] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[str | None, typer.Option(help="Push to this branch (created from main when missing).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of pushing to main.")] = (
        False
    ),
    commit_message: Annotated[str | None, typer.Option(help="Message of the commit that adds the model.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Hub URL (default: HF_ENDPOINT or huggingface.co).")] = None,
    token: Annotated[str | None, typer.Option(help="Hub token with write access (default: HF_TOKEN, then the saved "
                                                   "login of `hf auth login`).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    recipe: RecipeOption = None,
) -> None:
    """Check the model (files, code, weights, a load and forward pass without proxyv), then upload it to the Hub
    with a generated model card. A README.md in the folder is replaced by the generated card."""
    with user_errors(quiet):
        from .push import push as push_model

        v = from_recipe(ctx, recipe, locals(), {"model": "output", "repo_id": "push.repo_id", "private":
                                                "push.private", "revision": "push.revision",
                                                "create_pr": "push.create_pr"})
        require(v, model="MODEL", repo_id="--repo-id")
        model = Path(v["model"])
        result = push_model(
            model, v["repo_id"], private=v["private"], revision=v["revision"], create_pr=v["create_pr"],
            commit_message=commit_message, endpoint=endpoint, token=token, progress=not quiet,
        )
    changes = f"{len(result.changed)} changed" if result.changed else "all already up to date"
    where = f"pull request {result.pr_url}" if result.pr_url else f"{result.repo_url} (commit {result.commit[:12]})"
    typer.echo(
        f"Pushed {model} to {where}: {len(result.files)} files, {changes}. The model card pins "
        f'revision="{result.revision}", the commit that holds the model files; pin it too.'
    )
    typer.echo(
        f'Next: AutoModelForImageTextToText.from_pretrained("{result.repo_id}", revision="{result.revision}", '
        "trust_remote_code=True)"
    )


@app.command(
    epilog="Example: proxyv card ./llava-1.5-7b-proxyv-l12 --write",
)
def card(
    model: Annotated[Path, typer.Argument(help="ProxyV model folder.", show_default=False)],
    write: Annotated[bool, typer.Option("--write", help="Write README.md into the folder instead of printing.")] = (
        False
    ),
    repo_id: Annotated[str | None, typer.Option(help="Hub repository the usage example loads (default: the "
                                                     "folder).")] = None,
    revision: Annotated[str | None, typer.Option(help="Commit the usage example pins (with --repo-id).")] = None,
) -> None:
    """Generate the model card (README.md) from the folder's config, recipe and reports."""
    with user_errors():
        from .card import model_card, write_card

        if not write:
            typer.echo(model_card(model, repo_id=repo_id, revision=revision), nl=False)
            return
        path = write_card(model, repo_id=repo_id, revision=revision)
    typer.echo(f"Wrote {path}.")
    typer.echo(f"Next: proxyv push {model} --repo-id <your-name/model-name>")


@app.command(
    name="eval",
    epilog="Examples: proxyv eval ./m --data shapes        proxyv eval ./m --data ./vqa.jsonl --against-original",
)
def eval_command(
    ctx: typer.Context,
    model: Annotated[
        Path | None, typer.Argument(help="Model folder (ProxyV or plain LLaVA).", show_default=False)
    ] = None,
    data: Annotated[str, typer.Option(help="'shapes', a save_to_disk folder, a parquet/jsonl file, an image folder "
                                           "or a Hub dataset name, with answers.")] = default(EvalSection, "data"),
    split: Annotated[str, typer.Option(help="Split to evaluate; NAME[a:b] takes rows a..b of it.")] = default(
        EvalSection, "split"),
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N examples.")] = None,
    other: Annotated[Path | None, typer.Option(help="A second model folder: also report answer agreement.")] = None,
    against_original: Annotated[bool, typer.Option(
        "--against-original", help="Compare with the same model with ProxyV off (the original model).")] = default(
        EvalSection, "against_original"),
    proxyv_off: Annotated[bool, typer.Option("--proxyv-off", help="Evaluate with ProxyV off.")] = False,
    noise_images: Annotated[bool, typer.Option("--noise-images", help="Replace every image by noise (a control).")]
    = False,
    batch_size: Annotated[int, typer.Option(help="Examples per generate call.")] = default(EvalSection, "batch_size"),
    image_column: Annotated[str, typer.Option(help="Column with the images.")] = default(Columns, "image"),
    prompt_column: Annotated[str | None, typer.Option(help="Column with the questions (default: detected).")] = None,
    answer_column: Annotated[str | None, typer.Option(help="Column with the answers (default: detected).")] = None,
    video_column: Annotated[str | None, typer.Option(
        help="Column with videos: lists of frames or video files (default: a 'video' column, if any).")] = None,
    data_revision: Annotated[str | None, typer.Option(help="Revision of a Hub dataset.")] = None,
    no_write: Annotated[bool, typer.Option("--no-write", help="Do not write eval_report.json into the model "
                                                              "folder.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    recipe: RecipeOption = None,
) -> None:
    """Exact-match accuracy with greedy decoding, and answer agreement with a second model. The same data forms as
    distill. For a ProxyV folder the result is written to eval_report.json (the model card shows it), unless it is a
    control run (--proxyv-off, --noise-images)."""
    with user_errors(quiet):
        from .evaluate import evaluate, write_report

        v = from_recipe(ctx, recipe, locals(), {
            "model": "output", "data": "eval.data", "data_revision": "eval.data_revision", "split": "eval.split",
            "limit": "eval.limit", "batch_size": "eval.batch_size", "against_original": "eval.against_original",
            "image_column": "eval.columns.image", "prompt_column": "eval.columns.prompt",
            "answer_column": "eval.columns.answer", "video_column": "eval.columns.video",
        })
        require(v, model="MODEL")
        use_threads(threads)
        model = Path(v["model"])
        result = evaluate(
            model, v["data"], split=v["split"], limit=v["limit"], other=other,
            against_original=v["against_original"], proxyv_off=proxyv_off, noise_images=noise_images,
            batch_size=v["batch_size"], progress=not quiet, revision=v["data_revision"],
            columns=Columns(image=v["image_column"], prompt=v["prompt_column"], answer=v["answer_column"],
                            video=v["video_column"]),
        )
        control = proxyv_off or noise_images
        report = None if no_write or control else write_report(model, result)
    if json_output:
        typer.echo(result.to_json())
    else:
        typer.echo(f"{model}: {result.summary()}")
    if report is not None:
        typer.echo(f"Report: {report}")


@app.command(epilog="Example: proxyv bench ./m --batch-sizes 1 --batch-sizes 8 --compile")
def bench(
    ctx: typer.Context,
    model: Annotated[Path | None, typer.Argument(help="ProxyV model folder.", show_default=False)] = None,
    batch_sizes: Annotated[list[int], typer.Option(help="Batch sizes (repeat the option: --batch-sizes 1 "
                                                        "--batch-sizes 8).")] = default(BenchSection, "batch_sizes"),
    images: Annotated[list[int], typer.Option(help="Images per prompt (repeat the option).")] = default(
        BenchSection, "images"),
    text_tokens: Annotated[int, typer.Option(help="Text tokens per prompt.")] = default(BenchSection, "text_tokens"),
    repeats: Annotated[int, typer.Option(help="Timed repeats per side (median reported).")] = default(
        BenchSection, "repeats"),
    warmup: Annotated[int, typer.Option(help="Untimed runs per side first.")] = default(BenchSection, "warmup"),
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the language model (both sides)."
                                                )] = default(BenchSection, "compile"),
    cuda_graph: Annotated[bool, typer.Option("--cuda-graph", help="CUDA only: capture each side's language-model "
                                             "prefill in CUDA graphs (ProxyV's in two, its plan built while the first "
                                             "runs) and time their replays.")] = default(BenchSection, "cuda_graph"),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda when available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (as stored), float32, bfloat16 or float16.")] = default(
        BenchSection, "dtype"),
    attn: Annotated[str, typer.Option(help="Attention implementation: sdpa or eager.")] = default(BenchSection, "attn"),
    no_write: Annotated[bool, typer.Option("--no-write", help="Do not write bench_report.json.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    threads: ThreadsOption = None,
    recipe: RecipeOption = None,
) -> None:
    """Time prefill and decoding with ProxyV on and off on the same inputs; writes bench_report.json."""
    with user_errors():
        from .bench import run_bench

        v = from_recipe(ctx, recipe, locals(), {
            "model": "output", "batch_sizes": "bench.batch_sizes", "images": "bench.images",
            "text_tokens": "bench.text_tokens", "repeats": "bench.repeats", "warmup": "bench.warmup",
            "compile_model": "bench.compile", "cuda_graph": "bench.cuda_graph", "device": "bench.device",
            "dtype": "bench.dtype", "attn": "bench.attn",
        })
        require(v, model="MODEL")
        from .config import build

        # the options' bounds are the recipe's (`bench --batch-sizes 10000` is refused, not run out of memory)
        build(BenchSection, {name: v["compile_model" if name == "compile" else name]
                             for name in BenchSection.model_fields})
        use_threads(threads)
        report, path = run_bench(
            Path(v["model"]), batch_sizes=tuple(v["batch_sizes"]), images=tuple(v["images"]),
            text_tokens=v["text_tokens"], repeats=v["repeats"], warmup=v["warmup"], compile=v["compile_model"],
            cuda_graph=v["cuda_graph"], device=v["device"], dtype=v["dtype"], attn=v["attn"], write=not no_write,
            progress=lambda message: typer.echo(message, err=True),
        )
    from .bench import format_report

    typer.echo(report.to_json() if json_output else format_report(report))
    if path is not None:
        typer.echo(f"Report: {path}")


@app.command(
    epilog="Examples: proxyv run llava-shapes     proxyv run recipes/llava-1.5-7b.yaml distill.steps=100 --skip push",
)
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe.", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value overrides.", show_default=False)]
    = None,
    skip: Annotated[list[str] | None, typer.Option(help="Skip a stage (repeat the option).")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only this stage (repeat the option).")] = None,
    restart: Annotated[bool, typer.Option("--restart", help="Redo every stage, from the conversion.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    threads: ThreadsOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or stage messages.")] = False,
) -> None:
    """Run a recipe: convert, distill, eval, bench and push (when a repo id is set); a rerun continues."""
    with user_errors(quiet):
        from .run import run as run_recipe

        use_threads(threads)
        result = run_recipe(
            recipe, overrides or [], skip=tuple(skip or ()), only=tuple(only or ()), restart=restart,
            progress=not quiet, log=(lambda message: None) if quiet else (lambda m: typer.echo(m, err=True)),
        )
    if json_output:
        typer.echo(result.to_json())
        return
    done = ", ".join(result.stages_run) or "nothing"
    skipped = f" (finished earlier: {', '.join(result.stages_skipped)})" if result.stages_skipped else ""
    typer.echo(f"Ran {done}{skipped} in {result.seconds:.0f} s; the model is in {result.output}.")
    for name, value in result.numbers.items():
        typer.echo(f"  {name}: {value:.1%}" if "accuracy" in name or "agreement" in name else f"  {name}: {value}")
    typer.echo(f"Next: {result.next_command}")


recipes_app = typer.Typer(help="List and show the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list() -> None:
    """The shipped recipes and what each converts."""
    with user_errors():
        from .config import load_recipe, shipped_recipes

        for name, path in shipped_recipes().items():
            recipe, _ = load_recipe(path)
            typer.echo(f"{name:<24} {recipe.model.source} from layer {recipe.proxyv.start_layer} "
                       f"({', '.join(recipe.stages())})")


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Shipped recipe name or file.", show_default=False)]) -> None:
    """Print a recipe file."""
    with user_errors():
        from .config import recipe_path

        typer.echo(recipe_path(name).read_text(), nl=False)


@app.command(epilog="Example: proxyv validate recipes/llava-1.5-7b.yaml distill.steps=100")
def validate(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped recipe name.", show_default=False)],
    overrides: Annotated[list[str] | None, typer.Argument(help="section.key=value overrides.", show_default=False)]
    = None,
) -> None:
    """Check a recipe (keys, values, and the start layer and factor against the model) without running it."""
    with user_errors():
        from .config import check_against_model, load_recipe

        loaded, path = load_recipe(recipe, overrides or [])
        checked = check_against_model(loaded, str(path))
    typer.echo(f"{path}: valid ({', '.join(loaded.stages())}); {checked}.")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    """The `proxyv` entry point. Command-line mistakes (an unknown option, a value of the wrong type) are one line on
    stderr and exit code 2, like every other bad input."""
    try:
        from typer._click import exceptions as click_errors  # typer's own copy of click (0.2x)
    except ImportError:
        from click import exceptions as click_errors

    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="proxyv", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click_errors.UsageError as e:
        where = e.ctx.command_path if e.ctx else "proxyv"
        typer.echo(f"error: {' '.join(e.format_message().split())} (see `{where} --help`)", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    main()
