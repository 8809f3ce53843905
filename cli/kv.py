"""CLI parts of KV collaboration: `ask --collab kv` and `fuser train`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

fuser_app = typer.Typer(help="Cache fusers between two models (cache-to-cache collaboration).", no_args_is_help=True)


def ask_kv(client: Any, prompt: str, max_tokens: int, private: bool, json_: bool) -> None:
    """POST /v1/kv/ask and print the answer, then the path it took on stderr."""
    from knexa.cli.main import _post, _print_json

    body = {"query": prompt, "max_tokens": max_tokens, "private": private}
    result = _post(client, "/v1/kv/ask", body, timeout_s=600.0)
    if json_:
        _print_json(result)
        return
    sys.stdout.write(result["text"].strip() + "\n")
    details = result.get("details") or {}
    path = result["path"]
    if path == "prefix-hit":
        how = (f"prefix cache of {details.get('prefix_tokens')} tokens from {str(result['peer'])[:12]}…, "
               f"{details.get('computed_tokens')} computed here")
    elif path == "local-cache":
        how = f"prefix of {details.get('prefix_tokens')} tokens from this node's own store"
    elif path == "fused":
        how = f"fused with {str(result['peer'])[:12]}…'s cache through fuser {details.get('fuser')}"
    elif path == "text-hint":
        how = f"text hint from {str(result['peer'])[:12]}…"
    else:
        how = "computed here; " + "; ".join(result.get("attempts") or [])
    sent = " (private: only a rephrasing left this node)" if private and details.get("shared_text") else ""
    sys.stderr.write(f"(kv path: {path}: {how}{sent}; {result['elapsed_s']:.1f}s)\n")


@fuser_app.command("train")
def fuser_train(
    sharer: Annotated[str, typer.Option(help="The sharer's model folder (or 'embedded').")],
    corpus: Annotated[Path, typer.Option(help="A UTF-8 text file; paragraphs separated by blank lines.")],
    receiver: Annotated[str, typer.Option(help="The receiver's model folder, or 'embedded' (SmolLM2).")] = "embedded",
    name: Annotated[str | None, typer.Option(help="File name (default: from both weights hashes).")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder to save into (default: <cache dir>/fusers).")] = None,
    steps: Annotated[int, typer.Option(min=1, max=1_000_000)] = 200,
    lr: Annotated[float, typer.Option(min=1e-6, max=1.0)] = 1e-3,
    hidden: Annotated[int, typer.Option(min=8, max=8192, help="Width of each projection's hidden layer.")] = 256,
    budget_s: Annotated[float | None, typer.Option(help="Stop training after this many seconds.")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")] = "auto",
    data_dir: Annotated[Path | None, typer.Option(help="Node data dir (for its config's cache dir).")] = None,
    config: Annotated[Path | None, typer.Option(help="Config file.")] = None,
) -> None:
    """Train a fuser that projects the sharer's KV cache into the receiver's (both models frozen)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from knexa.cli.main import _config, fail
    from knexa.node.kvshare.fuser_cli import train_pair

    if not corpus.is_file():
        fail(f"no corpus file {corpus}", 2)
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        fail(f"--device must be auto, cpu or cuda, not {device!r}", 2)
    cache_dir = _config(data_dir, config).cache_dir
    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task("training fuser", total=steps, loss=float("nan"))
        try:
            report = train_pair(
                receiver, sharer, corpus, cache_dir=cache_dir, out_dir=out, name=name, steps=steps, lr=lr,
                hidden=hidden, budget_s=budget_s, device=device,
                progress=lambda step, loss: bar.update(task, completed=step + 1, loss=loss),
            )
        except (FileNotFoundError, ValueError, OSError) as exc:
            fail(str(exc))
    sys.stdout.write(
        f"fuser {report.name}: {report.steps} steps on {report.device} in {time.monotonic() - started:.0f}s "
        f"({report.train_texts} training texts); receiver loss on {report.held_out_texts} held-out texts "
        f"{report.held_out_before:.3f} untrained -> {report.held_out_after:.3f} trained\n"
        f"saved {report.weights} and {report.description}\n"
    )
