"""The bundle's model card (`README.md`), generated from its manifest, as the Hugging Face hub reads one.

`hf upload` of a bundle then gives a repo page users recognise: YAML front matter the hub indexes
(`base_model` with `base_model_relation: quantized`, `library_name`, tags, the source's license), then what
was exported and how, the quality measured as the manifest stores it, the device profiles it fits and how to
run it. Everything in it is read from the manifest (and the device profiles), never typed in twice, so the card
and `edgeq.json` cannot disagree; the card is written after the manifest and kept out of its checksummed files
(`edgeq.bundle`): nothing opens it, and a user may edit it before uploading.
"""
from __future__ import annotations

import re
from pathlib import Path

from .errors import EdgeqError

CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def sig4(value: float) -> str:
    """A measured number as the card shows it: 4 significant digits of the manifest's value."""
    return f"{value + 0.0:.4g}"  # + 0.0: a KL stored as -0.0 (rounding of a tiny negative sum) shows as 0


def source_facts(source) -> dict:
    """What the card says about where the model came from, recorded in the manifest's source at export: the hub id
    of the base model (from the hub source, config's `_name_or_path`, or the GGUF's `general.base_model.*`) and the
    license (from the GGUF's metadata or the source folder's own card)."""
    config_name = source.config.get("_name_or_path") or ""
    gguf = source.origin.get("gguf_file") or {}
    hub = (source.origin.get("hub") or {}).get("hub_id")
    base = hub or (config_name if _HUB_ID.fullmatch(config_name) else None) or next(iter(gguf.get("base_model") or []), None)
    facts = {"base_model": base or (Path(gguf["file"]).stem if gguf else source.path.name), "model_type": source.config.get("model_type")}
    license_ = gguf.get("license") or _front_matter(source.path / CARD_FILE).get("license")
    if license_:
        facts["license"] = license_
    return facts


def _front_matter(path: Path) -> dict:
    """A model card's YAML front matter (empty when there is none, or it does not parse: a license is optional)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def weight_shares(manifest: dict) -> list[tuple[str, float, int]]:
    """(type, share of the weights, tensors) per type the written file holds, largest share first."""
    import math

    weights: dict[str, list[int]] = {}
    for info in (manifest.get("tensors") or {}).values():
        entry = weights.setdefault(info["type"], [0, 0])
        entry[0] += math.prod(info.get("shape") or [0])
        entry[1] += 1
    total = sum(w for w, _ in weights.values()) or 1
    return sorted(((t, w / total, n) for t, (w, n) in weights.items()), key=lambda row: -row[1])


def fitting_devices(manifest: dict) -> list[tuple[str, float]]:
    """Built-in device profiles that run the bundle's format and hold its weights and a full KV cache at the
    profile's context within their memory budget: (id, GiB resident)."""
    from edgeq.devices import list_devices, load_device

    from . import registry
    from .profiling import kv_bytes_per_token

    tensors = manifest.get("tensors") or {}
    weights = sum(t.get("bytes", 0) for t in tensors.values())
    kv_type = (manifest.get("kv_cache") or {}).get("type")
    kv = kv_bytes_per_token(tensors, {}, registry.formats.get(manifest["format"]).kv_bytes_per_element(kv_type)) or 0
    fits = []
    for name in list_devices():
        profile = load_device(name)
        resident = weights + kv * min(profile.context_length, manifest.get("context_length") or profile.context_length)
        if manifest["format"] in profile.formats and resident <= profile.budget_bytes:
            fits.append((profile.id, resident / 2**30))
    return fits


def front_matter(manifest: dict) -> dict:
    source = manifest.get("source") or {}
    fmt = manifest["format"]
    tags = ["edgeq", fmt, str(manifest["precision"]).lower(), "quantized"]
    if source.get("model_type"):
        tags.append(source["model_type"])
    if (manifest.get("device") or {}).get("id"):
        tags.append(manifest["device"]["id"])
    from . import registry

    data = {"base_model": source.get("base_model") or "unknown", "base_model_relation": "quantized",
            "library_name": registry.formats.get(fmt).hub_library or fmt, "pipeline_tag": "text-generation", "tags": tags}
    if source.get("license"):
        data["license"] = source["license"]
    return data


def _quality_rows(manifest: dict) -> list[str]:
    rows = []
    if q := manifest.get("quality"):
        rows += [f"| KL divergence (nats/token) | {sig4(q['kl'])} | {q.get('text') or 'built-in sample'}, {q['tokens']} tokens |",
                 f"| top-1 agreement | {sig4(q['top1'])} | same tokens |",
                 f"| perplexity | {sig4(q['ppl'])} | reference {sig4(q['ppl_ref'])} |"]
    if f := manifest.get("finetune_quality"):
        data = (f.get("data") or {}).get("path") or "eval data"
        rows += [f"| KL divergence on eval data | {sig4(f['kl'])} | {Path(str(data)).name}, {f['tokens']} assistant tokens |",
                 f"| top-1 agreement on eval data | {sig4(f['top1'])} | same tokens |"]
        if f.get("flip_retention") is not None:
            rows.append(f"| flip retention | {sig4(f['flip_retention'])} | {f.get('flips')} positions the fine-tune changed |")
        if f.get("noise_to_shift") is not None:
            rows.append(f"| noise-to-shift | {sig4(f['noise_to_shift'])} | KL(fine-tune‖export) ÷ KL(fine-tune‖base) |")
        if (agreement := f.get("agreement") or {}).get("exact_match") is not None:
            rows.append(f"| greedy replies identical | {sig4(agreement['exact_match'])} | {agreement['replies']} prompts |")
    return rows


def _exported(manifest: dict, name: str) -> list[str]:
    source = manifest.get("source") or {}
    lines = [f"- **Format**: {manifest['format']} (`{manifest['model_file']}`, run by {manifest['runtime']}), "
             f"{manifest.get('bits_per_weight', '?')} bits per weight as written"]
    lines.append("- **Precisions** (share of the weights): " + ", ".join(
        f"{t} {share:.1%} ({n} tensors)" for t, share, n in weight_shares(manifest)))
    if plan := manifest.get("plan"):
        lines.append(f"- **Planned** per tensor within {plan['budget_bytes'] / 2**20:.1f} MiB from measured sensitivity")
    if cal := manifest.get("calibration"):
        digest = f", sha256 `{cal['sha256'][:16]}…`" if cal.get("sha256") else ""
        lines.append(f"- **Calibration data**: {Path(str(cal['text'])).name}{digest}, {cal.get('tokens')} tokens")
    origin = source.get("base_model")
    if gguf := source.get("gguf_file"):
        lines.append(f"- **Source**: the GGUF `{Path(gguf['file']).name}` ({gguf['precision']}, sha256 `{gguf['sha256'][:16]}…`), "
                     "dequantized to float32; the quality below is measured against it, not against the model it was quantized from")
    elif hub := source.get("hub"):
        lines.append(f"- **Source**: [{hub['hub_id']}](https://huggingface.co/{hub['hub_id']}) at revision `{hub['revision']}`")
    else:
        lines.append(f"- **Source**: {origin} ({source.get('architecture')})")
    if adapter := source.get("adapter"):
        where = (adapter.get("hub") or {}).get("hub_id") or Path(adapter["path"]).name
        lines.append(f"- **LoRA adapter merged**: {where} (sha256 `{str(adapter.get('sha256'))[:16]}…`)")
    for kept in manifest.get("adapters") or []:
        lines.append(f"- **LoRA adapter kept apart**: `{kept['name']}` in `{kept['file']}`")
    return lines


def _run_lines(manifest: dict, name: str) -> list[str]:
    from . import registry

    spec = registry.formats.get(manifest["format"])
    lines = ["With edgeq (`pip install edgeq`), from this folder:", "", "```bash", f'edgeq run {name} "Hello!"',
             f"edgeq serve {name}   # OpenAI-compatible API on 127.0.0.1:8000", "```", ""]
    if spec.run_elsewhere:
        lines.append(spec.run_elsewhere.format(model_file=manifest["model_file"], name=name))
    return lines


def render(manifest: dict, name: str) -> str:
    """The card's text for the bundle folder `name`."""
    import yaml

    from . import __version__

    head = yaml.safe_dump(front_matter(manifest), sort_keys=False, allow_unicode=True).strip()
    source = manifest.get("source") or {}
    device = (manifest.get("device") or {}).get("id")
    lines = ["---", head, "---", "", f"# {name}", "",
             f"{source.get('base_model', 'A model')} in {manifest['format']} ({manifest['precision']}), exported by edgeq "
             f"{manifest.get('edgeq_version', __version__)}" + (f" for the {device} profile." if device else "."), "",
             "## What was exported", "", *_exported(manifest, name), "", "## Measured quality", ""]
    rows = _quality_rows(manifest)
    if rows:
        lines += ["Against the float source on the same tokens (as `edgeq.json` records it):", "",
                  "| metric | value | measured on |", "|---|---|---|", *rows]
    else:
        lines.append("Not measured at export (`--eval-tokens 0`); `edgeq eval` measures it.")
    fits = fitting_devices(manifest)
    lines += ["", "## Devices it fits", ""]
    lines += ([f"- {dev}: {gib:.2f} GiB with a full context" for dev, gib in fits] if fits else
              ["None of edgeq's built-in device profiles (`edgeq devices`) runs this format within its memory budget."])
    lines += ["", "## How to run it", "", *_run_lines(manifest, name)]
    return "\n".join(lines).rstrip() + "\n"


def write_card(folder: Path, manifest: dict, name: str | None = None) -> Path:
    """Writes `README.md` into the (staged) bundle folder from its manifest; `name` is the bundle's final name."""
    path = Path(folder) / CARD_FILE
    try:
        path.write_text(render(manifest, name or Path(folder).name), encoding="utf-8")
    except KeyError as exc:  # a manifest without a field the card needs: a bug here, not the user's
        raise EdgeqError(f"the model card could not be written: manifest field {exc} is missing") from exc
    return path
