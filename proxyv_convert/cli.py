"""The `proxyv` command line: a thin Typer layer over the library, one function per command.

Each command makes one library call inside `user_errors()`, which turns a ProxyVError into `error: <message>` on
stderr and its exit code, and Ctrl-C into exit code 130; anything else keeps its traceback. Library modules are
imported inside the commands, so `proxyv --help` and `proxyv --version` start without loading torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import ProxyVError

app = typer.Typer(
    name="proxyv",
    help="Convert LLaVA checkpoints into ProxyV models: much faster image prefill, every vision token kept.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """ProxyVError -> `error: <message>` on stderr and its exit code; Ctrl-C -> exit code 130."""
    try:
        yield
    except ProxyVError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted (nothing was left half-written)", err=True)
        raise typer.Exit(130) from None


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
    src: Annotated[str, typer.Argument(help="LLaVA checkpoint: a local folder or a Hub id.", show_default=False)],
    layer: Annotated[int, typer.Option("--layer", "-l", help="First decoder layer that runs ProxyV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist, unless --overwrite).")],
    reduce_factor: Annotated[int, typer.Option(help="Downsample each image's token grid by this factor per side.")] = 4,
    dtype: Annotated[str, typer.Option(help="auto (keep), float32, bfloat16 or float16.")] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists (once the new folder is complete).")
    ] = False,
    revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit of SRC.")] = None,
    trust_remote_code: Annotated[
        bool, typer.Option("--trust-remote-code", help="Allow custom code in SRC's config.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Insert ProxyV modules into a LLaVA checkpoint and write a ProxyV checkpoint (weights streamed, not loaded)."""
    with user_errors():
        from .convert import convert as convert_checkpoint

        result = convert_checkpoint(
            src,
            out,
            layer=layer,
            reduce_factor=reduce_factor,
            dtype=dtype,
            overwrite=overwrite,
            revision=revision,
            trust_remote_code=trust_remote_code,
            progress=not quiet,
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
    model: Annotated[Path, typer.Argument(help="ProxyV model folder (from proxyv convert).", show_default=False)],
    data: Annotated[str, typer.Option(help="'shapes', a save_to_disk folder, a parquet/jsonl file, an image folder "
                                           "or a Hub dataset name.", show_default=False)],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Examples per process and micro-batch.")] = 8,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine to 10%).")] = 1e-3,
    max_length: Annotated[
        int, typer.Option(help="Longest sequence in tokens (the text after the image is cut).")
    ] = 2048,
    out: Annotated[Path | None, typer.Option(help="Write the distilled model here instead of in place.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")
    ] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = 50,
    hidden_loss: Annotated[
        str, typer.Option(help="Per-token hidden-state distance: relative, mse or cosine.")
    ] = "relative",
    vision_weight: Annotated[float, typer.Option(help="Weight of the hidden-state term on vision tokens.")] = 1.0,
    text_weight: Annotated[float, typer.Option(help="Weight of the hidden-state term on text tokens.")] = 1.0,
    kl_weight: Annotated[float, typer.Option(help="Weight of the KL term on the next-token distributions.")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 10,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this value.")] = 1.0,
    gradient_accumulation: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing",
                                                         help="Recompute activations to save memory.")] = False,
    mixed_precision: Annotated[str, typer.Option(help="no, bf16 or fp16 (accelerate autocast).")] = "no",
    seed: Annotated[int, typer.Option(help="Seed of the data order.")] = 0,
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    eval_split: Annotated[str, typer.Option(help="Held-out split for the before/after report (else the tail of "
                                                  "the train split is held out).")] = "validation",
    eval_examples: Annotated[int, typer.Option(help="Held-out examples in the report.")] = 200,
    image_column: Annotated[str, typer.Option(help="Column with the images.")] = "image",
    prompt_column: Annotated[str | None, typer.Option(help="Column with the prompts (default: detected).")] = None,
    answer_column: Annotated[str | None, typer.Option(help="Column with the answers (default: detected).")] = None,
    data_revision: Annotated[str | None, typer.Option(help="Revision of a Hub dataset.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train the ProxyV modules to match the same model with ProxyV off; only the ProxyV tensors change."""
    with user_errors():
        from .data import Columns
        from .distill import DistillSettings
        from .distill import distill as run_distill

        settings = DistillSettings(
            steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
            max_grad_norm=max_grad_norm,
            max_length=max_length, hidden_loss=hidden_loss, vision_weight=vision_weight, text_weight=text_weight,
            kl_weight=kl_weight, checkpoint_every=checkpoint_every, gradient_accumulation=gradient_accumulation,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, seed=seed,
            train_split=train_split, eval_split=eval_split, eval_examples=eval_examples,
        )
        result = run_distill(
            model, data, settings=settings, out=out, resume=resume, revision=data_revision, progress=not quiet,
            columns=Columns(image=image_column, prompt=prompt_column, answer=answer_column),
        )
    if result.report:
        before, after = result.report["before"], result.report["after"]
        typer.echo(f"Distilled {result.out}: {result.steps} steps in {result.seconds:.0f} s.")
        typer.echo(f"  hidden-state cosine (vision) {before['cosine_vision']:.4f} -> {after['cosine_vision']:.4f}; "
                   f"next-token agreement {before['top1']:.1%} -> {after['top1']:.1%}")
        if "task" in after:
            typer.echo(f"  answers: teacher {after['task']['teacher_accuracy']:.1%}, student "
                       f"{before['task']['student_accuracy']:.1%} -> {after['task']['student_accuracy']:.1%}, "
                       f"agreement {before['task']['answer_agreement']:.1%} -> {after['task']['answer_agreement']:.1%}")
        typer.echo(f"Report: {result.out / 'distill_report.json'}")
    typer.echo(f"Next: proxyv eval {result.out} --data {data}")


@app.command(
    epilog="Example: proxyv push ./llava-1.5-7b-proxyv-l12 --repo-id me/llava-1.5-7b-proxyv-l12",
)
def push(
    model: Annotated[Path, typer.Argument(help="ProxyV model folder to publish.", show_default=False)],
    repo_id: Annotated[str, typer.Option(help="Hub repository, e.g. your-name/model-name (created when missing).",
                                         show_default=False)],
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
) -> None:
    """Check the model (files, code, weights, a load and forward pass without proxyv), then upload it to the Hub
    with a generated model card. A README.md in the folder is replaced by the generated card."""
    with user_errors():
        from .push import push as push_model

        result = push_model(
            model, repo_id, private=private, revision=revision, create_pr=create_pr, commit_message=commit_message,
            endpoint=endpoint, token=token, progress=not quiet,
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
    epilog="Examples: proxyv eval ./m --data shapes        proxyv eval ./m --data shapes --against-original",
)
def eval_command(
    model: Annotated[Path, typer.Argument(help="Model folder (ProxyV or plain LLaVA).", show_default=False)],
    data: Annotated[str, typer.Option(help="'shapes', a save_to_disk folder, a parquet/jsonl file, an image folder "
                                           "or a Hub dataset name, with answers.")] = "shapes",
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    limit: Annotated[int | None, typer.Option(help="Evaluate only the first N examples.")] = None,
    other: Annotated[Path | None, typer.Option(help="A second model folder: also report answer agreement.")] = None,
    against_original: Annotated[bool, typer.Option(
        "--against-original", help="Compare with the same model with ProxyV off (the original model).")] = False,
    proxyv_off: Annotated[bool, typer.Option("--proxyv-off", help="Evaluate with ProxyV off.")] = False,
    noise_images: Annotated[bool, typer.Option("--noise-images", help="Replace every image by noise (a control).")]
    = False,
    batch_size: Annotated[int, typer.Option(help="Examples per generate call.")] = 50,
    image_column: Annotated[str, typer.Option(help="Column with the images.")] = "image",
    prompt_column: Annotated[str | None, typer.Option(help="Column with the questions (default: detected).")] = None,
    answer_column: Annotated[str | None, typer.Option(help="Column with the answers (default: detected).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Exact-match accuracy with greedy decoding, and answer agreement with a second model."""
    with user_errors():
        from .evaluate import evaluate

        result = evaluate(
            model, data, split=split, limit=limit, other=other, against_original=against_original,
            proxyv_off=proxyv_off, noise_images=noise_images, batch_size=batch_size, progress=not quiet,
            image_column=image_column, question_column=prompt_column, answer_column=answer_column,
        )
    if json_output:
        typer.echo(result.to_json())
    else:
        typer.echo(f"{model}: {result.summary()}")


@app.command(epilog="Example: proxyv bench ./m --batch-sizes 1 8 --compile")
def bench(
    model: Annotated[Path, typer.Argument(help="ProxyV model folder.", show_default=False)],
    batch_sizes: Annotated[list[int], typer.Option(help="Batch sizes (repeat the option).")] = [1],  # noqa: B006
    images: Annotated[list[int], typer.Option(help="Images per prompt (repeat the option).")] = [1],  # noqa: B006
    text_tokens: Annotated[int, typer.Option(help="Text tokens per prompt.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed repeats per side (median reported).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed runs per side first.")] = 3,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the language model (both sides)."
                                                )] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda when available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (as stored), float32, bfloat16 or float16.")] = "auto",
    attn: Annotated[str, typer.Option(help="Attention implementation: sdpa or eager.")] = "sdpa",
    no_write: Annotated[bool, typer.Option("--no-write", help="Do not write bench_report.json.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Time prefill and decoding with ProxyV on and off on the same inputs; writes bench_report.json."""
    with user_errors():
        from .bench import run_bench

        report, path = run_bench(
            model, batch_sizes=tuple(batch_sizes), images=tuple(images), text_tokens=text_tokens, repeats=repeats,
            warmup=warmup, compile=compile_model, device=device, dtype=dtype, attn=attn, write=not no_write,
            progress=lambda message: typer.echo(message, err=True),
        )
    from .bench import format_report

    typer.echo(report.to_json() if json_output else format_report(report))
    if path is not None:
        typer.echo(f"Report: {path}")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
