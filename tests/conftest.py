"""Tiny random-config models built in-process (no downloads), shared by the unit tests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789 numbers and words.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Héllo wörld — ünïcode, 日本語のテキスト, emojis 🙂🚀 and    runs   of spaces\n\n\nnewlines.",
    "Large language models run on phones, laptops and small boards at the edge.",
] * 20


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE with SmolLM2's pre-tokenizer (digits split, byte level), trained on a toy corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 256,
    }))


def build_sentencepiece_tokenizer(folder: Path) -> None:
    """A SentencePiece BPE with byte fallback (as Llama 2, TinyLlama, Mistral) plus ChatML tokens added by a fine-tune.

    Trained in a blink on edgeq's calibration text and saved by transformers (a Metaspace pre-tokenizer),
    tokenizer.model beside tokenizer.json."""
    import io
    from importlib.resources import files

    import sentencepiece
    from transformers import AutoTokenizer

    lines = [line for line in files("edgeq").joinpath("calibration_text.txt").read_text().splitlines() + CORPUS if line.strip()]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=500, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
    }))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = "{{ bos_token }}" + CHATML
    tok.save_pretrained(folder)


GEMMA_CHAT = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def build_gemma_tokenizer(folder: Path) -> None:
    """Gemma's tokenizer in miniature: SentencePiece BPE with byte fallback and no space prefix, <pad> <eos> <bos>
    <unk> = 0-3, the turn markers as pieces, BOS added; converted and saved by transformers as Gemma's is."""
    import io
    from importlib.resources import files

    import sentencepiece
    from transformers import AutoTokenizer

    lines = [line for line in files("edgeq").joinpath("calibration_text.txt").read_text().splitlines() + CORPUS if line.strip()]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=500, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, add_dummy_prefix=False,
        normalization_rule_name="identity", minloglevel=2, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
    }))
    tok = AutoTokenizer.from_pretrained(folder, add_bos_token=True)
    tok.chat_template = GEMMA_CHAT
    tok.save_pretrained(folder)


def build_model(folder: Path, architecture: str = "LlamaForCausalLM", seed: int = 0, tokenizer=build_tokenizer,
                norm_noise: float = 0.0, **overrides) -> Path:
    """A random model of `architecture` (a transformers class) with `overrides` of the tiny config; `norm_noise`
    perturbs every norm gain (initialised to one value), so a norm applied wrong shows in the logits."""
    import torch
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer(folder)
    vocab = json.loads((folder / "tokenizer.json").read_text())
    n_vocab = max([*vocab["model"]["vocab"].values(), *(t["id"] for t in vocab["added_tokens"])]) + 1
    model_cls = getattr(transformers, architecture)
    config_cls = model_cls.config_class
    settings = dict(
        vocab_size=n_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2, initializer_range=0.2,
    )
    if "text_config" in config_cls.sub_configs:  # multimodal: the tiny settings describe its text model
        text = {**settings, **overrides.pop("text_config", {})}
        config = config_cls(text_config=text, **{"tie_word_embeddings": text["tie_word_embeddings"], **overrides})
    else:
        config = config_cls(**{**settings, **overrides})
    if architecture == "Qwen3ForCausalLM":
        config.head_dim = 16
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    if norm_noise:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(torch.randn_like(param) * norm_noise)
    config = config.get_text_config() if "text_config" in config_cls.sub_configs else config
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}))
    return folder


def build_lora(folder: Path, base: Path, rank: int = 2, alpha: int = 4, seed: int = 1, modules_to_save=None, extra_rows: int = 0) -> Path:
    """A PEFT-format LoRA adapter written by hand (same files PEFT writes), with nonzero B."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = json.loads((base / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // n_head
    shapes = {"q_proj": (hidden, hidden), "v_proj": (n_kv * head_dim, hidden), "down_proj": (hidden, inter)}
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (rows, cols) in shapes.items():
            kind = "mlp" if module == "down_proj" else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{kind}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, cols) * 0.3
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(rows, rank) * 0.3
    for name in modules_to_save or []:
        rows = config["vocab_size"] + extra_rows
        tensors[f"base_model.model.{name}.weight"] = torch.randn(rows, hidden) * 0.2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(shapes),
        "modules_to_save": modules_to_save, "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM",
        "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_sentencepiece_llama(tmp_path_factory) -> Path:
    """A Llama 2-style checkpoint: SentencePiece tokenizer, <s> = 1, </s> = 2."""
    return build_model(tmp_path_factory.mktemp("tiny") / "tiny-spm-llama", tokenizer=build_sentencepiece_tokenizer, bos_token_id=1)


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory, tiny_llama) -> Path:
    return build_lora(tmp_path_factory.mktemp("lora") / "tiny-lora", tiny_llama)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Sensitivity caches of the tests go to a temporary folder (session-wide, before any other fixture).

    The default model stays in the user's cache: rebuilding it from its GGUF for every run would
    only repeat the same dequantization."""
    from edgeq.default_model import cache_dir

    models = cache_dir() / "models"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEQ_CACHE", str(tmp_path_factory.getbasetemp() / "edgeq-cache"))
        (tmp_path_factory.getbasetemp() / "edgeq-cache").mkdir(exist_ok=True)
        if models.is_dir():
            (tmp_path_factory.getbasetemp() / "edgeq-cache" / "models").symlink_to(models)
        yield


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_llama) -> Path:
    """tiny_llama as a Q8_0 GGUF file, as a user would hold one (written by edgeq's converter, llama.cpp's quantizer)."""
    import edgeq

    bundle = edgeq.export(tiny_llama, format="gguf", precision="Q8_0", output=tmp_path_factory.mktemp("gguf") / "tiny", eval_tokens=0)
    return bundle / "model.gguf"
