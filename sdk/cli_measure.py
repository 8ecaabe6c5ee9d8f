"""`edgeq eval`, `edgeq profile` and `edgeq compare`: the commands that measure bundles (registered on the
`edgeq` group by `edgeq.cli`)."""
from __future__ import annotations

import json

import click

from . import cli_types as types
from .cli_types import progress_flag


@click.command("eval")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--text", type=types.TextFile("eval text"), help="UTF-8 text to measure on (default: a built-in sample).")
@click.option("--tokens", default=4096, show_default=True, type=types.TOKENS, help="Tokens to measure on.")
@click.option("--ctx", default=512, show_default=True, type=types.CONTEXT, help="Window length: the text is cut into non-overlapping windows of this many tokens.")
@click.option("--reference", help="Reference model: an HF folder, hub id or .gguf file (default: the source the manifest names).")
@click.option("--backend", help="Runtime to use instead of the one the bundle names.")
@click.option("--threads", type=types.THREADS, help="CPU threads.")
@click.option("--eval-data", type=types.TextFile("eval data"),
              help="Judge on the fine-tune's own data instead (JSONL chats or prompt/completion, or text): KL and top-1 on "
                   "assistant tokens, greedy-reply agreement (exact match, tokens to divergence, chrF) and, with a base "
                   "model, flip retention and noise-to-shift (see `edgeq export --help`).")
@click.option("--base", type=click.Path(file_okay=False), help="The model before fine-tuning (default: the model under the bundle's adapter).")
@click.option("--adapter", help="Measure this LoRA adapter of the bundle, switched on over its base, against the float merged model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (kl, top1, ppl, ppl_ref, tokens, ctx; with --eval-data: "
                                                         "kl, top1, agreement, flip_retention, noise_to_shift).")
def evaluate(bundle, text, tokens, ctx, reference, backend, threads, eval_data, base, adapter, as_json):
    """Measure BUNDLE against the torch reference on the same tokens: mean KL, top-1 agreement, perplexity.

    With --eval-data: how much of the fine-tune the export keeps. Flip retention is, at the positions where the
    fine-tune's most likely token differs from the base model's, the share where the export's is still the
    fine-tune's; noise-to-shift is mean KL(fine-tune ‖ export) ÷ mean KL(fine-tune ‖ base) on the same tokens.
    """
    from .quality import evaluate as run_eval

    if text and eval_data:
        raise click.UsageError("pass --text or --eval-data, not both")
    quality = run_eval(bundle, text=text, tokens=tokens, ctx=ctx, reference=reference, backend=backend, threads=threads,
                       eval_data=eval_data, base=base, adapter=adapter, progress=progress_flag())
    if as_json:
        click.echo(json.dumps(quality.to_dict()))
    elif eval_data:
        q = quality.to_dict()
        agreement = q["agreement"] or {}
        click.echo(f"KL {q['kl']:.5f}  top-1 {q['top1']:.4f}  on {q['tokens']} assistant tokens")
        if agreement:
            click.echo(f"replies: exact {agreement['exact_match']:.3f}  tokens to divergence {agreement['tokens_to_divergence']:.1f}  "
                       f"chrF {agreement['chrf']:.1f}  ({agreement['replies']} prompts)")
        if q["flip_retention"] is not None or q["noise_to_shift"] is not None:
            click.echo(f"fine-tune: flip retention {q['flip_retention']}  noise-to-shift {q['noise_to_shift']}  ({q['flips']} flipped positions)")
    else:
        click.echo(f"KL {quality.kl:.5f}  top-1 {quality.top1:.4f}  ppl {quality.ppl:.3f}  reference ppl {quality.ppl_ref:.3f}  ({quality.tokens} tokens, ctx {quality.ctx})")


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--prompt-tokens", default="64,512", show_default=True, type=types.TokenCounts(), help="Prompt lengths to time, comma-separated.")
@click.option("--gen", default=128, show_default=True, type=types.TOKENS, help="Tokens decoded greedily after each prompt.")
@click.option("--repeat", default=5, show_default=True, type=types.TOKENS, help="Measured repeats after one warm-up (median and spread).")
@click.option("--threads", type=types.THREADS, help="CPU threads (default: the runtime's, all cores for llama.cpp).")
@click.option("--device", "-d", help="Add an ESTIMATE for this device profile (a built-in name or a .toml file).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full result as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG chart of size × KL × decode speed.")
@click.option("--draft", metavar="lookup|DIR", help="Also measure speculative decoding with this drafter: tok/s with and without, "
              "accepted tokens per pass (and, with --device, the estimated speedup there).")
@click.option("--etdump", type=click.Path(exists=True, dir_okay=False),
              help="Measure nothing here: read this ExecuTorch ETDump, recorded by an app running the (one) executorch BUNDLE on a "
                   "device, and show time per layer and per operator beside the --device profile's bandwidth roofline.")
def profile(bundles, prompt_tokens, gen, repeat, threads, device, json_path, plot_path, draft, etdump):
    """Measure BUNDLES on this machine: load time, time to first token, prefill and decode tokens/s, peak memory, size,
    and decode against the memory-bandwidth roofline. With --etdump: where the time went on the device that ran it."""
    from .profiling import profile as run_profile

    _check_outputs(json_path, plot_path)
    if etdump:
        _trace(bundles, etdump, device, json_path, plot_path)
        return
    _report(run_profile(bundles, prompt_tokens=prompt_tokens, gen=gen, repeat=repeat, threads=threads, device=device, draft=draft),
            json_path, plot_path)


def _trace(bundles, etdump, device, json_path, plot_path) -> None:
    from .profile_trace import profile_trace

    if len(bundles) != 1 or plot_path:
        raise click.UsageError("--etdump reads the trace of one bundle (pass one BUNDLE, no --plot)")
    result = profile_trace(bundles[0], etdump, device)
    click.echo(result.table())
    if json_path:
        click.echo(f"wrote {result.save_json(json_path)}")


def _check_outputs(json_path, plot_path) -> None:
    """Output paths (and matplotlib for a chart) checked before minutes of measuring."""
    from .profile_report import check_output, require_matplotlib

    for path in filter(None, (json_path, plot_path)):
        check_output(path)
    if plot_path:
        require_matplotlib()


def _report(result, json_path, plot_path) -> None:
    click.echo(result.table())
    if json_path:
        click.echo(f"wrote {result.save_json(json_path)}")
    if plot_path:
        click.echo(f"wrote {result.plot(plot_path)}")


@click.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--eval-data", required=True, type=types.TextFile("eval data"),
              help="The fine-tune's data: JSONL chats or prompt/completion (assistant tokens are scored), or text.")
@click.option("--base", type=click.Path(file_okay=False), help="The model before fine-tuning (default: the model under the bundles' adapter).")
@click.option("--tokens", default=2048, show_default=True, type=types.TOKENS, help="Assistant tokens of --eval-data to score.")
@click.option("--gen", default=64, show_default=True, type=types.TOKENS, help="Tokens decoded greedily to time decode.")
@click.option("--repeat", default=3, show_default=True, type=types.TOKENS, help="Timed repeats after one warm-up.")
@click.option("--threads", type=types.THREADS, help="CPU threads.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full result as JSON to this file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG chart of size × KL on the data × decode speed.")
def compare(bundles, eval_data, base, tokens, gen, repeat, threads, json_path, plot_path):
    """Compare BUNDLES of one fine-tune: size, quality on its own data (KL, retention, reply agreement) and decode speed."""
    from .comparing import compare as run_compare

    _check_outputs(json_path, plot_path)
    _report(run_compare(bundles, eval_data=eval_data, base=base, tokens=tokens, gen=gen, repeat=repeat, threads=threads,
                        progress=progress_flag()), json_path, plot_path)
