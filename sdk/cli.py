"""The `edgeq` command: a thin shell over the Python API (each command calls one edgeq function)."""
from __future__ import annotations

import json
import logging
import sys
import time

import click

from . import cli_types as types
from .cli_measure import compare, evaluate, profile
from .cli_types import progress_flag
from .errors import EdgeqError


def _usage_error(exc: click.ClickException) -> None:
    """click's usage errors as one line (click prints usage, a hint and a blank line around them)."""
    command = getattr(getattr(exc, "ctx", None), "command_path", None)
    hint = f" (see `{command} -h`)" if command and isinstance(exc, click.UsageError) else ""
    click.echo(f"error: {exc.format_message()}{hint}", err=True)
    sys.exit(exc.exit_code)


class Group(click.Group):
    """Every failure is one line on stderr: EdgeqError (exit 1), a usage error (2), an interrupt or SIGTERM
    (130), and anything else as an internal error that names --debug, the one switch that shows tracebacks."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `edgeq`: the help is the answer
                raise
            _usage_error(exc)

    def invoke(self, ctx):
        from .interrupts import stop_children, terminate_as_interrupt

        started = time.time()
        try:
            with terminate_as_interrupt():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:
            _usage_error(exc)
        except EdgeqError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            stop_children(started)
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except Exception as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            detail = str(exc).splitlines()[0][:200] if str(exc) else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {detail} — a bug in edgeq; rerun with --debug "
                       "and report the traceback", err=True)
            sys.exit(1)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks and backend logs.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does (and what the libraries underneath warn).")
@click.option("--progress/--no-progress", default=None, help="Show progress bars (default: only on a terminal).")
@click.version_option(package_name="edgeq")
@click.pass_context
def main(ctx, debug, verbose, progress):
    """Export fine-tuned small language models for edge devices, then run, evaluate and profile them."""
    from .progress import quiet_libraries

    ctx.obj = {"debug": debug, "progress": progress}
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not (debug or verbose):
        quiet_libraries()


@main.command()
@click.argument("model", required=False)
@click.option("--revision", help="With a hub id: the branch, tag or commit to use (default: main).")
@click.option("--device", "-d", help="Device profile: a built-in name (see `edgeq devices`) or a .toml file.")
@click.option("--adapter", "adapters", multiple=True, metavar="[NAME=]DIR",
              help="PEFT LoRA adapter folder (or hub id org/name) to merge into MODEL; with --keep-adapters, NAME=DIR once per adapter to keep apart.")
@click.option("--keep-adapters", is_flag=True,
              help="Convert MODEL once and write each --adapter as its own file in the engine's adapter form (gguf, onnx), "
                   "switched per request (`edgeq run --adapter NAME`).")
@click.option("--adapter-data", multiple=True, metavar="NAME=FILE", help="With --keep-adapters: adapter NAME's own eval data (as --eval-data).")
@click.option("--compare-merged", is_flag=True,
              help="With --keep-adapters: also measure each adapter merged then quantized, beside the float adapter over the base.")
@click.option("--format", "format_", help="Output format (gguf, …); default: the best one the device runs.")
@click.option("--precision", help="Force one precision for every tensor, e.g. Q4_K_M, Q8_0, F16, int4; default: planned per tensor for the device.")
@click.option("--size", type=types.SIZE, help="Plan within this size instead of the device's, e.g. 95MB or 1.2GiB.")
@click.option("--bits-per-weight", type=types.BITS_PER_WEIGHT, help="Plan within this many bits per weight on average (0-32].")
@click.option("--calibration", type=types.TextFile("calibration text"),
              help="UTF-8 text like the model's real input: the text GPTQ rounds on (gguf: given, it switches GPTQ on; onnx, "
                   "executorch, coreml --rounding gptq: default a built-in text), the importance matrix of coreml int4 and of "
                   "gguf types GPTQ has no grid for; with a plan: the sensitivity measurement.")
@click.option("--calibration-tokens", default=8192, show_default=True, type=types.TOKENS, help="Tokens of --calibration to use (windows of 512).")
@click.option("-o", "--output", type=click.Path(), help="Bundle folder to create (default: MODEL-DEVICE-PRECISION).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at the output path.")
@click.option("--trust-pickle", is_flag=True, help="Allow pickle (.bin) weights, which can run code when loaded.")
@click.option("--eval-tokens", default=1024, show_default=True, type=types.TOKENS_OR_ZERO, help="Tokens of the short quality check stored in the manifest (0 skips it).")
@click.option("--mobile", is_flag=True, help="onnx: also write the ORT format (.ort) and the operator config ONNX Runtime Mobile builds need.")
@click.option("--block-size", type=click.IntRange(min=1), help="onnx int4: input columns per quantization block (16, 32, 64, 128 or 256; "
                                              "default: 32 with float16 scales, 64 for a layer that keeps float32 ones; else 16 or 32).")
@click.option("--rounding", type=click.Choice(["gptq", "nearest", "learned"]),
              help="gptq rounds with error feedback on calibration text, so a 4-bit lm_head keeps quality (minutes on "
                   "1B+ models); nearest rounds each block alone (seconds; the lm_head stays 8-bit). onnx int4/int8: gptq "
                   "by default; gguf and coreml int4: gptq (in gguf's own block types) by default with --calibration, "
                   "else nearest (gguf: llama.cpp's own rounding); learned refines gptq's levels layer by layer against "
                   "the float model's outputs (several times gptq's time).")
@click.option("--effort", type=click.Choice(["fast", "standard", "max"]),
              help="How hard to work for quality, in every format: fast rounds each block to its nearest levels "
                   "(seconds); standard (default) is each format's default rounding: error feedback (GPTQ) for onnx, "
                   "and for gguf and coreml with --calibration (minutes at 1B+). max learns each layer's rounding "
                   "against the float model's outputs, on top of GPTQ (several times standard's time; needs 2048 "
                   "calibration tokens). Instead of --rounding.")
@click.option("--kv-cache", type=click.Choice(["auto", "f16", "q8_0", "q4_0"]),
              help="gguf: the type llama.cpp stores its KV cache in (type_k/type_v). auto (default) chooses it with the "
                   "weights on a --device whose memory binds at its context (measured at long context), else f16.")
@click.option("--rotate", type=click.Choice(["off", "on", "auto"]),
              help="Rotate the residual stream (a randomised Hadamard, and one per attention head on v/o) in the "
                   "weights before quantizing: the same function, outlier channels spread so 4-bit grids fit better; "
                   "no new runtime op, every format. auto quantizes both ways on the calibration text and keeps the "
                   "lower KL (it is no free win: it can lose), declining a rotation whose file is over 1% larger (an "
                   "untied head). Not for Gemma 3 or --keep-adapters. Default: on for onnx rounded by GPTQ (where the "
                   "model allows it), off elsewhere.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="NAME=TYPE",
              help="With --precision: give one tensor (HF name) another type, e.g. lm_head.weight=int4 (repeatable).")
@click.option("--eval-data", type=types.TextFile("eval data"),
              help="The fine-tune's own data to judge the export on: JSONL chats ({\"messages\": [...]}), JSONL "
                   "{\"prompt\", \"completion\"}, or text. Chats are rendered with the model's template; only assistant "
                   "tokens are scored. Adds KL, top-1 and greedy-reply agreement (and, with --adapter or --base, "
                   "flip retention and noise-to-shift) to the manifest.")
@click.option("--base", type=click.Path(file_okay=False),
              help="The model before fine-tuning, for retention metrics of an already-merged fine-tune (with --adapter "
                   "the base is known).")
@click.option("--max-kl", type=click.FloatRange(min=0), help="Target: mean KL(fine-tune ‖ export) on --eval-data (or the built-in sample) at most this.")
@click.option("--min-retention", type=click.FloatRange(0, 1),
              help="Target: flip retention at least this — of the positions where the fine-tune's top token differs from "
                   "the base model's, the share where the export's top token is still the fine-tune's.")
@click.option("--min-agreement", type=click.FloatRange(0, 1),
              help="Target: share of the eval data's prompts whose greedy reply equals the fine-tune's, at least this.")
@click.option("--allow-quality-miss", is_flag=True, help="Write the bundle even when a target is missed (the miss is recorded in the manifest).")
def export(model, revision, device, adapters, keep_adapters, adapter_data, compare_merged, format_, precision, size, bits_per_weight,
           calibration, calibration_tokens, output, overwrite, trust_pickle, eval_tokens, mobile, block_size, rounding, effort, kv_cache,
           rotate, tensor_types, eval_data, base, max_kl, min_retention, min_agreement, allow_quality_miss):
    """Export MODEL (default: SmolLM2-135M-Instruct) into a bundle for a device.

    \b
    MODEL is a Hugging Face checkpoint folder, a hub id (org/name: from the hub cache when offline, downloaded
    with your token otherwise; org/name:Q4_K_M picks that type from a repo of GGUFs) or a .gguf file, which is
    dequantized first (quality is then measured against the GGUF). A local folder wins over a hub id.

    With --device (or --size / --bits-per-weight) and no --precision, edgeq measures how much each
    tensor's quantization costs on calibration text and picks a precision per tensor that fits.
    """
    from .export_options import ExportOptions
    from .exporting import run

    out = run(ExportOptions(model, revision=revision, device=device, adapters=list(adapters) or None, keep_adapters=keep_adapters,
                            adapter_data=_pairs(adapter_data, "--adapter-data", "NAME=FILE, e.g. summarizer=held_out.jsonl"),
                            compare_merged=compare_merged, format=format_, precision=precision, calibration=calibration,
                            calibration_tokens=calibration_tokens, output=output, overwrite=overwrite, trust_pickle=trust_pickle,
                            eval_tokens=eval_tokens, size=size, bits_per_weight=bits_per_weight, mobile=mobile, block_size=block_size,
                            rounding=rounding, effort=effort, kv_cache=kv_cache, rotate=rotate, tensor_types=_name_types(tensor_types), eval_data=eval_data, base=base, max_kl=max_kl,
                            min_retention=min_retention, min_agreement=min_agreement, allow_quality_miss=allow_quality_miss,
                            progress=progress_flag()))
    click.echo(out)
    _print_summary(out)


def _name_types(pairs: tuple[str, ...]) -> dict[str, str] | None:
    return _pairs(pairs, "--tensor-type", "NAME=TYPE, e.g. lm_head.weight=int4")


def _pairs(pairs: tuple[str, ...], option: str, form: str) -> dict[str, str] | None:
    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise click.BadParameter(f"{pair!r} is not {form}", param_hint=option)
        values[name.strip()] = value.strip()
    return values or None


def _print_summary(bundle) -> None:
    from .bundle import read_manifest

    from .model_card import weight_shares

    m = read_manifest(bundle, verify=False)
    size = sum(f["bytes"] for f in m["files"].values())
    mix = ", ".join(f"{t} {share:.0%}" if share >= 0.005 else f"{t} <1%" for t, share, _ in weight_shares(m))
    what = f"planned: {mix} of weights" if m.get("plan") else f"precision {m['precision']} ({mix} of weights)"
    click.echo(f"  format {m['format']}  {what}; {m.get('bits_per_weight', '?')} bits/weight  {size / 2**20:.1f} MiB")
    if q := m.get("quality"):
        click.echo(f"  vs reference: KL {q['kl']:.4f}  top-1 {q['top1']:.3f}  ppl {q['ppl']:.2f} (reference {q['ppl_ref']:.2f}) "
                   f"on {q['tokens']} tokens of the {q.get('text') or 'built-in sample'}")
    if check := m.get("plan_check"):
        predicted_on = f" on the {check['predicted_on']}" if check.get("predicted_on") else ""
        measured_on = f" on the {check['measured_on']}" if check.get("measured_on") else ""
        click.echo(f"  plan: predicted KL {check['predicted_kl']:.4f}{predicted_on}, measured {check['measured_kl']:.4f}{measured_on}"
                   + (f" — {check['note']}" if "note" in check else ""))
    if (kv := m.get("kv_cache")) and kv["type"] != "f16":
        click.echo(f"  KV cache {kv['type']} ({kv['bytes_per_token'] * kv['context'] / 2**20:.1f} MiB at {kv['context']} tokens)")
    if problems := m.get("mismatches"):  # one line however many tensors fell back; inspect --json lists them
        first = problems[0]
        click.echo(f"  note: {len(problems)} tensor(s) got another type than asked, e.g. {first['tensor']} asked "
                   f"{first['asked']}, got {first['got']} ({first['why']}); `edgeq inspect --json` lists them")
    for entry in m.get("adapters") or []:
        where = (f"functions {' / '.join(entry['functions'].values())} of {m['model_file']}" if entry.get("functions")
                 else entry["file"])  # Core ML: an adapter is a pair of the package's functions
        click.echo(f"  adapter {entry['name']}: {where} {entry['bytes'] / 2**20:.2f} MiB  rank {entry['rank']}  "
                   f"scaling {'/'.join(map(str, entry['scaling']))}{' (rsLoRA)' if entry['rslora'] else ''}  on {', '.join(entry['targets'])}")
        for label, key in (("separate", "quality"), ("merged  ", "merged_quality")):
            if q := entry.get(key):
                agreement = q.get("agreement") or {}
                retention = f"  flip retention {q['flip_retention']:.3f}" if q.get("flip_retention") is not None else ""
                exact = f"  greedy exact {agreement['exact_match']:.3f}" if agreement else ""
                click.echo(f"    {label}: KL {q['kl']:.4f}  top-1 {q['top1']:.3f}{exact}{retention}  (vs the float merged model)")
    if note := m.get("untied_head"):
        click.echo(f"  note: {note}")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt", required=False, type=types.NonEmpty())
@click.option("--system", help="System message for chat models.")
@click.option("--raw", is_flag=True, help="Send PROMPT as plain text, without the chat template.")
@click.option("--max-new-tokens", type=types.MAX_NEW_TOKENS, help="Most tokens to generate (default: 256, fewer if the context has less room).")
@click.option("--temperature", default=0.0, show_default=True, type=types.TEMPERATURE, help="0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=types.TOP_P, help="Nucleus sampling mass.")
@click.option("--top-k", default=0, show_default=True, type=types.TOP_K, help="Sample among the k most likely tokens (0: all).")
@click.option("--repetition-penalty", default=1.0, show_default=True, type=types.REPETITION_PENALTY, help="Penalty for tokens already seen (1: none).")
@click.option("--stop", multiple=True, type=types.NonEmpty(), help="Stop string (repeatable).")
@click.option("--seed", type=types.SEED, help="Random seed for sampling.")
@click.option("--threads", type=types.THREADS, help="CPU threads (default: the device profile's, else all cores).")
@click.option("--backend", help="Runtime to use instead of the one the bundle names.")
@click.option("--adapter", help="Answer with this LoRA adapter of the bundle (exported with --keep-adapters); default: the base.")
@click.option("--draft", metavar="lookup|DIR", help="Speculative decoding: `lookup` (n-grams of the prompt and reply) or a smaller "
              "bundle with the same tokenizer drafting tokens the model verifies; same output, faster where a pass is cheap.")
@click.option("--draft-tokens", default=8, show_default=True, type=click.IntRange(1, 32), help="Most tokens drafted per verification pass.")
def run(bundle, prompt, system, raw, max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed, threads, backend, adapter,
        draft, draft_tokens):
    """Generate from BUNDLE: answer PROMPT (streamed), or chat when no PROMPT is given."""
    from .loading import load

    model = load(bundle, backend=backend, threads=threads, draft=draft, draft_tokens=draft_tokens)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   repetition_penalty=repetition_penalty, stop=list(stop), seed=seed, stream=True,
                   adapter=model.check_adapter(adapter))
    chat = model.tokenizer.chat_template is not None and not raw
    history = [{"role": "system", "content": system}] if system else []

    def reply(text):
        if not chat:
            pieces = model.generate(text, **options)
        else:
            history.append({"role": "user", "content": text})
            # the engine's cache still holds the earlier turns, so only this message is prefilled;
            # once the chat outgrows the context, its oldest turns are dropped
            pieces = model.generate(messages=history, truncate=True, **options)
        answer = []
        for piece in pieces:
            answer.append(piece)
            click.echo(piece, nl=False)
        click.echo()
        if chat:
            history.append({"role": "assistant", "content": "".join(answer)})

    if prompt is not None:
        reply(prompt)
        return
    click.echo("chat: type a message, empty line or Ctrl-D to quit", err=True)
    while (text := click.prompt(">", default="", show_default=False, prompt_suffix=" ")).strip():
        reply(text)


@main.command()
@click.argument("bundles", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0 exposes it to the network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port (0 picks a free one).")
@click.option("--api-key", envvar="EDGEQ_API_KEY", help="Require this bearer token on /v1 requests (or set EDGEQ_API_KEY).")
@click.option("--queue-size", default=8, show_default=True, type=click.IntRange(0, 10_000),
              help="Requests that may wait per model while it generates; one more gets 429.")
@click.option("--timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Seconds one request may take, waiting included.")
@click.option("--threads", type=types.THREADS, help="CPU threads per model (default: the device profile's, else all cores).")
@click.option("--backend", help="Runtime to use instead of the one each bundle names.")
@click.option("--draft", "drafts", multiple=True, metavar="[MODEL=]lookup|DIR",
              help="Speculative decoding for bundle MODEL (all bundles without MODEL=): `lookup` or a draft bundle; repeatable.")
@click.option("--draft-tokens", default=8, show_default=True, type=click.IntRange(1, 32), help="Most tokens drafted per verification pass.")
def serve(bundles, host, port, api_key, queue_size, timeout, threads, backend, drafts, draft_tokens):
    """Serve BUNDLES over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health).

    A request's "model" is a bundle's folder name, or BUNDLE:NAME for a LoRA adapter kept in it (--keep-adapters),
    switched per request on the one loaded base. Each model generates one request at a time; tools,
    response_format (JSON schema, regex, grammar) and streaming work as in OpenAI's API.
    """
    from .serving.listener import parse_drafts, serve as run_server

    server = run_server(list(bundles), host=host, port=port, api_key=api_key, queue_size=queue_size, timeout=timeout,
                        threads=threads, backend=backend, block=False, log_level="warning", drafts=parse_drafts(drafts), draft_tokens=draft_tokens)
    names = ", ".join(server.service.names())
    click.echo(f"serving {names} on {server.url}/v1 (Ctrl-C stops)", err=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect(bundle, as_json):
    """Show what BUNDLE holds: format, precision per tensor, source, device, measured quality (checksums verified)."""
    from .bundle import read_manifest

    manifest = read_manifest(bundle)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    click.echo(f"{bundle}: edgeq {manifest['edgeq_version']}, created {manifest['created']}")
    src = manifest.get("source", {})
    click.echo(f"  source {src.get('path')} ({src.get('architecture')})" + (f" + adapter {src['adapter']['path']}" if src.get("adapter") else ""))
    if manifest.get("device"):
        click.echo(f"  device {manifest['device']['id']}  context {manifest.get('context_length')}")
    _print_summary(bundle)
    counts: dict[str, int] = {}
    for info in manifest.get("tensors", {}).values():
        counts[info["type"]] = counts.get(info["type"], 0) + 1
    click.echo("  tensor types: " + ", ".join(f"{t} ×{n}" for t, n in sorted(counts.items())))


@main.command()
@click.argument("model", required=False)
@click.option("--revision", help="With a hub id: the branch, tag or commit to use (default: main).")
@click.option("--device", "-d", help="Device profile whose budget and format to plan for.")
@click.option("--format", "format_", default="gguf", show_default=True, help="Format whose precisions to choose from (gguf, onnx, coreml).")
@click.option("--size", type=types.SIZE, help="Budget as a size, e.g. 95MB (instead of the device's).")
@click.option("--bits-per-weight", type=types.BITS_PER_WEIGHT, help="Budget as average bits per weight (0-32].")
@click.option("--adapter", help="PEFT LoRA adapter folder (or hub id org/name) merged into MODEL first.")
@click.option("--calibration", type=types.TextFile("calibration text"), help="UTF-8 text to measure sensitivity on (default: built-in text).")
@click.option("--kv-cache", type=click.Choice(["auto", "f16", "q8_0", "q4_0"]),
              help="gguf: the type llama.cpp stores its KV cache in (type_k/type_v). auto (default) chooses it with the "
                   "weights on a --device whose memory binds at its context (measured at long context), else f16.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model, revision, device, format_, size, bits_per_weight, adapter, calibration, kv_cache, as_json):
    """Show the precision edgeq would give each tensor of MODEL: tensor, precision, bytes, predicted ΔKL.

    MODEL is a Hugging Face folder, a hub id (org/name, org/name:Q4_K_M) or a .gguf file, as for `edgeq export`."""
    from .planning import plan as run_plan

    result = run_plan(model, revision=revision, device=device, format=format_, size=size, bits_per_weight=bits_per_weight,
                      adapter=adapter, calibration=calibration, kv_cache=kv_cache, progress=progress_flag())
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{'tensor':52} {'precision':>13} {'bytes':>11} {'pred. ΔKL':>10}")
    for e in result.entries:
        click.echo(f"{e.tensor:52} {e.precision:>13} {e.bytes:>11,} {e.dkl:>10.5f}")
    counts: dict[str, int] = {}
    for e in result.entries:
        counts[e.precision] = counts.get(e.precision, 0) + 1
    click.echo(f"total {result.total_bytes / 2**20:.2f} MiB of budget {result.budget_bytes / 2**20:.2f} MiB; "
               f"predicted KL {result.predicted_kl:.4f}; " + ", ".join(f"{p} ×{n}" for p, n in sorted(counts.items())))
    info = result.sensitivity
    click.echo(f"sensitivity: {info['measured_tensors']} tensors measured, proxy rank correlation {info['proxy_rank_correlation']}")
    if info.get("gptq_gains"):
        spread = sorted(g for by_precision in info["gptq_gains"].values() for g in by_precision.values())
        click.echo(f"priced for GPTQ rounding: it leaves {spread[0]:.2f}-{spread[-1]:.2f} of nearest rounding's error, by kind "
                   "and precision, on calibration text it did not round on")
    if result.kv_cache:
        _print_kv_trade(result.kv_cache)


def _print_kv_trade(kv: dict) -> None:
    click.echo(f"KV cache {kv['type']}: {kv['bytes'] / 2**20:.1f} MiB at {kv['context']} tokens"
               + ("" if kv["memory_binds"] else " (memory does not bind: a smaller cache would buy the weights nothing)"))
    if kv["trade"]:
        click.echo(f"  {'cache':<6} {'cache MiB':>9} {'weights MiB':>11} {'weights KL':>10} {'cache KL':>9} {'total':>8}"
                   f"   (cache KL measured over {kv['measured_tokens']} tokens)")
        for row in kv["trade"]:
            click.echo(f"  {row['type']:<6} {row['bytes'] / 2**20:>9.1f} {row['weights_budget'] / 2**20:>11.1f} "
                       f"{row['weights_kl']:>10.4f} {row['predicted_kl']:>9.5f} {row['weights_kl'] + row['predicted_kl']:>8.4f}"
                       + ("  <- chosen" if row["type"] == kv["type"] else ""))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the profiles as JSON.")
def devices(as_json):
    """List the built-in device profiles."""
    from edgeq.devices import list_devices, load_device

    profiles = [load_device(name) for name in list_devices()]
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    for p in profiles:
        click.echo(f"{p.id:18} {p.name:28} RAM {p.ram_gib:>5.1f} GiB  budget {p.budget_gib:>4.1f} GiB  "
                   f"{p.bandwidth_gbps:>6.1f} GB/s  {', '.join(p.formats)}")


@main.command()
@click.argument("release_file", type=click.Path(dir_okay=False))
@click.option("--ray", metavar="ADDRESS", help="Run the tasks on a Ray cluster: its address, or `auto` for the cluster this "
                                               "machine joined (pip install 'edgeq[ray]'). Default: local worker processes.")
def release(release_file, ray):
    """Build every cell (model × device) of RELEASE_FILE and write report.json and report.html beside the bundles.

    Cells whose inputs are unchanged since the last run are reused. A cell that fails or misses its
    quality target leaves no bundle, is named in the report, and makes the command exit with 1.
    """
    from .releasing.run import release as run_release

    result = run_release(release_file, ray=ray, progress=progress_flag())
    click.echo(result.table())
    click.echo(f"report: {result.html_path}")
    if not result.ok:
        bad = [f"{c['model']}/{c['device']}" for c in result.failures()]
        raise EdgeqError(f"{len(bad)} of {len(result.cells)} cells did not pass ({', '.join(bad)}); see {result.html_path}")


main.add_command(evaluate)
main.add_command(profile)
main.add_command(compare)
