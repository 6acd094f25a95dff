"""Models and tokenizers: loading, capture-site discovery, adapters, saving.

Sources (``ModelConfig.name_or_path``): 'embedded' (the project's cached tiny in-context learner),
'tiny:<arch>' (random weights with seed 0 and a small byte-level BPE tokenizer; Qwen/GPT families
without BOS like their real tokenizers), a local directory, or a hub id. Tokenizers without a pad
token pad with EOS (else UNK); embeddings are never resized. Adapters are PEFT (LoRA, IA3, prompt
and prefix tuning) or full fine-tuning; Llama projection names given as targets map to other
families' modules (GPT-2 ``attn.c_attn``/``attn.c_proj``, GPT-NeoX ``attention.query_key_value``/
``attention.dense``).

Capture sites are found structurally so that any decoder family works: the decoder's layer stack is
the ``nn.ModuleList`` holding ``num_hidden_layers`` blocks of one class, and each block's attention
sub-module is the child whose name says attention (self_attn, attn, attention, self_attention).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from ia2dist.errors import IA2Error

log = logging.getLogger("ia2dist")

_ATTN_NAMES = ("self_attn", "self_attention", "attn", "attention")


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


def num_layers_of(config) -> int:
    """Decoder layers of a model config (num_hidden_layers / n_layer / num_layers)."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise IA2Error(f"model: {type(config).__name__} states no number of layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (works through PEFT wrappers)."""
    expected = _num_layers(model)
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise ValueError(f"could not find the decoder layer stack of {type(model).__name__} "
                         f"(expected a ModuleList of {expected} identical blocks)")
    return best


def _attention_child(block: nn.Module) -> nn.Module:
    children = dict(block.named_children())
    for name in _ATTN_NAMES:
        if name in children:
            return children[name]
    candidates = [m for n, m in children.items()
                  if ("attn" in n.lower() or "attention" in n.lower()) and "norm" not in n.lower()
                  and "ln" not in n.lower() and "cross" not in n.lower()]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"could not identify the self-attention sub-module of {type(block).__name__}; "
                     f"children are {sorted(children)}")


def attention_sites(model: nn.Module) -> list[nn.Module]:
    """One module per decoder layer whose output (first element when a tuple) is the attention
    block's output after its output projection, before the residual add."""
    return [_attention_child(block) for block in decoder_layers(model)]


def check_supported(model: nn.Module, where: str = "model.name_or_path") -> None:
    """IA2Error (one line) unless ``model`` is a decoder-only causal LM whose every decoder layer
    has a self-attention block to capture: encoder-decoder and encoder (masked-LM) families, and
    families with state-space, recurrent or convolution layers (Mamba, RWKV, xLSTM, Jamba, Bamba,
    Zamba, Falcon-H1, LFM2's conv layers, ...) are refused before any work."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    cfg = getattr(model, "config", None)
    name, family = type(model).__name__, getattr(cfg, "model_type", "?")
    fix = "use a decoder-only causal LM (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, ...)"
    if getattr(cfg, "is_encoder_decoder", False):
        raise IA2Error(f"{where}: {name} ({family}) is an encoder-decoder model; IA2 aligns the "
                       f"self-attention of a decoder-only causal LM; {fix}")
    if family in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise IA2Error(f"{where}: {name} ({family}) is an encoder family used as a decoder; IA2 "
                       f"aligns the self-attention of a decoder-only causal LM; {fix}")
    try:
        attention_sites(model)
    except ValueError as exc:
        raise IA2Error(f"{where}: {name} ({family}) is not supported: {exc} (IA2 needs a "
                       f"self-attention block in every decoder layer); {fix}") from None


# --------------------------------------------------------------------------------------------------
# Devices, tokenizers, models
# --------------------------------------------------------------------------------------------------

#: Text the 'tiny:<arch>' tokenizer is trained on: the task templates, digits and common words.
TINY_TOKENIZER_TEXTS = [
    "Text:the movie was great\nLabel:1",
    "Text:a dull and boring plot\nLabel:0",
    "Question:What is 12 plus 30?\nAnswer:12 + 30 = 42\n#### 42",
    "Question:Which planet is red?\nChoices:\n[apple]Mars\n[Friday]Venus\n\nAnswer:apple",
    "[banana]Saturn\n[Saturday]Earth\n[Thursday][Sunday][Wednesday][Monday]",
    "The answer is \\boxed{7}. alpha beta gamma delta 0 1 2 3 4 5 6 7 8 9",
] * 10

#: Families whose real tokenizers add no BOS; their 'tiny:' tokenizer mimics that.
_NO_BOS_ARCHS = ("qwen2", "qwen3", "gpt2", "gpt_neox")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Attention kernel for models loaded from disk or the hub ('tiny:' models use eager): None lets
#: transformers pick sdpa (the fast one on GPUs) where the family supports it, else eager (Gemma 2,
#: GPT-OSS, ...). Both give the same greedy responses as the naive reference.
ATTN_IMPLEMENTATION = None


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise IA2Error(f"model.device: {name!r} is not a device ({exc}); use auto, cpu, cuda or "
                       f"cuda:N") from None


def _tiny_arch(name_or_path: str) -> str | None:
    if not name_or_path.startswith("tiny:"):
        return None
    from ia2dist.tiny import TINY_ARCHS

    arch = name_or_path[len("tiny:"):]
    if arch not in TINY_ARCHS:
        raise IA2Error(f"model.name_or_path: unknown tiny architecture {arch!r}; use tiny:<arch> "
                       f"with arch in {', '.join(TINY_ARCHS)}")
    return arch


def _looks_local(path: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything path-like must exist on disk."""
    return path.startswith(("/", ".", "~")) or path.count(os.sep) >= 2 or (
        os.altsep is not None and path.count(os.altsep) >= 2)


def _resolve_source(name_or_path: str, cache_dir: str | None, field_name: str,
                    gguf_file: str | None = None) -> str:
    """A local directory or a hub id for ``from_pretrained`` ('embedded' becomes its directory, a
    GGUF source its cached dequantized copy: see ``ia2dist.gguf``)."""
    if name_or_path == "embedded":
        from ia2dist.embedded import get_embedded_model_dir

        return str(get_embedded_model_dir(cache_dir))
    from ia2dist.gguf import resolve_gguf_source

    converted = resolve_gguf_source(name_or_path, gguf_file, cache_dir, field_name)
    if converted is not None:
        return converted
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise IA2Error(f"{field_name}: {name_or_path} is a file; give the directory holding "
                       f"config.json and the weights")
    if _looks_local(name_or_path):
        raise IA2Error(f"{field_name}: directory {name_or_path} does not exist; fix the path, or "
                       f"use a hub id (org/name), 'embedded' or 'tiny:<arch>'")
    return name_or_path


def _hub_error(field_name: str, source: str, exc: Exception) -> IA2Error:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return IA2Error(f"{field_name}: could not load {source!r} ({type(exc).__name__}: {first}); "
                    f"check the id, network access or the HF cache (HF_HUB_OFFLINE), or use a "
                    f"local directory")


def _finish_tokenizer(tokenizer, padding_side: str):
    if tokenizer.pad_token is None:
        # Reuse an existing token: adding one would need resized embeddings. Masks are always built
        # from lengths, never from pad ids, so sharing the id with EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else \
            tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise IA2Error("model.tokenizer: the tokenizer has no pad, eos or unk token to pad "
                           "with; use a tokenizer that defines one of them")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(model_cfg):
    """The tokenizer of ``model_cfg`` (``ModelConfig``) with a pad token and its padding side set.

    A missing pad token becomes EOS (else UNK); embeddings are never resized.
    """
    name = model_cfg.tokenizer or model_cfg.name_or_path
    arch = _tiny_arch(name)
    if arch is not None:
        from ia2dist.tiny import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(TINY_TOKENIZER_TEXTS, vocab_size=384,
                                         add_bos=arch not in _NO_BOS_ARCHS)
        return _finish_tokenizer(tokenizer, model_cfg.padding_side)
    field_name = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
    source = _resolve_source(name, model_cfg.cache_dir, field_name,
                             None if model_cfg.tokenizer else model_cfg.gguf_file)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _hub_error(field_name, source, exc) from None
    return _finish_tokenizer(tokenizer, model_cfg.padding_side)


def model_source(model_cfg, *, build: bool = True) -> str:
    """The local directory (or hub id) ``from_pretrained`` loads the model of ``model_cfg`` from.

    'embedded' and 'tiny:<arch>' are built once into the cache (``model.cache_dir`` or
    ``$IA2DIST_CACHE``), so every process and every loader (whole, partitioned, device map) reads
    the same files. With ``build=False`` a source that is not built yet raises FileNotFoundError
    instead of being built in this process (see ``build_source_elsewhere``)."""
    arch = _tiny_arch(model_cfg.name_or_path)
    if arch is not None:
        return str(tiny_model_dir(arch, model_cfg.cache_dir, build=build))
    if model_cfg.name_or_path == "embedded" and not build:
        from ia2dist.embedded import cached_embedded_model_dir

        path = cached_embedded_model_dir(model_cfg.cache_dir)
        if path is None:
            raise FileNotFoundError("embedded model not built yet")
        return str(path)
    if not build:
        from ia2dist.gguf import resolve_gguf_source

        converted = resolve_gguf_source(model_cfg.name_or_path, model_cfg.gguf_file,
                                        model_cfg.cache_dir, build=False)
        if converted is not None:
            return converted
    return _resolve_source(model_cfg.name_or_path, model_cfg.cache_dir, "model.name_or_path",
                           model_cfg.gguf_file)


def build_source_elsewhere(model_cfg) -> None:
    """Build the model files of 'embedded' / 'tiny:<arch>' / a GGUF source (when not cached yet)
    in a child process, so that a process which must never hold model weights (the distributed
    driver) can read their config and tokenizer. Raises IA2Error with the child's last line on
    failure."""
    try:
        model_source(model_cfg, build=False)
        return
    except FileNotFoundError:
        pass
    import json
    import subprocess

    code = ("import json, sys\nfrom ia2dist.config import ModelConfig\n"
            "from ia2dist.errors import IA2Error\nfrom ia2dist.modeling import model_source\n"
            "try:\n    model_source(ModelConfig(**json.loads(sys.argv[1])))\n"
            "except IA2Error as exc:\n    print(f'IA2Error: {exc}', file=sys.stderr)\n"
            "    sys.exit(2)\n")
    fields = {"name_or_path": model_cfg.name_or_path, "cache_dir": model_cfg.cache_dir,
              "gguf_file": model_cfg.gguf_file}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(fields)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        if last.startswith("IA2Error: "):  # the input's own one-line error
            raise IA2Error(last[len("IA2Error: "):])
        raise IA2Error(f"model.name_or_path: building {model_cfg.name_or_path!r} failed ({last}); "
                       f"check model.cache_dir / $IA2DIST_CACHE is writable")


def tiny_model_dir(arch: str, cache_dir: str | None = None, *, build: bool = True):
    """The directory of the 'tiny:<arch>' model (random weights, seed 0, and its tokenizer),
    written once under a file lock into a temporary directory renamed when complete."""
    from ia2dist.io import cache_root, locked_build

    final = cache_root(cache_dir) / f"tiny-{arch}-v1"
    if not build and not (final / "config.json").is_file():
        raise FileNotFoundError(final)

    def build_into(tmp):
        from ia2dist.tiny import build_tiny_model, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(TINY_TOKENIZER_TEXTS, vocab_size=384,
                                         add_bos=arch not in _NO_BOS_ARCHS)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            model = build_tiny_model(arch, tokenizer, seed=0)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)

    return locked_build(final, final / "config.json", build_into)


def _attn_implementation(source: str) -> str:
    """sdpa for real models; the 'tiny:' toys keep the eager kernel they were tested with."""
    return "eager" if os.path.basename(os.path.normpath(source)).startswith("tiny-") \
        else ATTN_IMPLEMENTATION


def load_model_config(model_cfg):
    """The transformers config of ``model_cfg``'s model: sizes, layers, context length, without
    loading (or building) weights."""
    from transformers import AutoConfig

    try:
        source = model_source(model_cfg, build=False)
    except FileNotFoundError:
        build_source_elsewhere(model_cfg)
        source = model_source(model_cfg, build=False)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _hub_error("model.name_or_path", source, exc) from None


def load_model(model_cfg, device: torch.device | str | None = None, *,
               device_map: dict | None = None, source: str | None = None) -> nn.Module:
    """The causal LM of ``model_cfg`` in eval mode, in ``model_cfg.dtype``, on ``device``
    (default: ``model_cfg.device``). 'tiny:<arch>' models are random with seed 0.

    device_map: place the layers over several devices instead ({module name: device}, as
    ``plan_device_map`` computes; accelerate moves activations between them). source: a model
    directory to load instead of the configured model (e.g. a fully fine-tuned student)."""
    dtype = _DTYPES[model_cfg.dtype]
    source = source or model_source(model_cfg)
    from transformers import AutoModelForCausalLM

    model = None
    if device_map is None:
        device = resolve_device(model_cfg.device) if device is None else torch.device(device)
        if not model_cfg.trust_remote_code:  # a local directory: read tensor by tensor
            from ia2dist.weights import load_lean

            model = load_lean(source, dtype, device, _attn_implementation(source))
    if model is None:
        kwargs = {"device_map": device_map} if device_map is not None else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=_attn_implementation(source),
                trust_remote_code=model_cfg.trust_remote_code, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise _hub_error("model.name_or_path", source, exc) from None
        if device_map is None:
            model = model.to(device=device, dtype=dtype)
    check_supported(model)
    return model.eval()


def placement_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules in forward order at the granularity a device map places them: every
    module beside the decoder layer stack (embeddings, final norm, LM head, ...) and each decoder
    layer whole."""
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    stack = names[id(layers)]
    path = stack.split(".")
    units: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is layers:
                units.extend((f"{full}.{i}", layer) for i, layer in enumerate(layers))
            elif depth < len(path) - 1 and name == path[depth]:
                visit(child, full + ".", depth + 1)
            else:
                units.append((full, child))
    visit(model, "", 0)
    return units


def plan_device_map(model_config, dtype: str, budgets: Sequence[int],
                    devices: Sequence[int | str] | None = None) -> dict[str, int | str]:
    """A device map that splits one model over several devices: modules in forward order, whole
    decoder layers, balanced so that each device holds about 1/k of the weights, never more than
    its budget (bytes of weights; the caller leaves room for activations and the KV cache).
    ``devices`` default to 0..k-1 (CUDA indices). Built from the config alone (no weights).
    Tied weights stay with the module that owns them. Raises IA2Error when the weights do not fit.
    accelerate dispatches the map (``from_pretrained(device_map=...)``) and moves activations
    between devices."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    devices = list(devices) if devices is not None else list(range(len(budgets)))
    if len(devices) != len(budgets) or not budgets:
        raise ValueError("plan_device_map: one budget per device")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=_DTYPES[dtype])
    # tied weights (e.g. the LM head sharing the embeddings): {tied name: source name}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    owner: dict[str, str] = {}
    units = []
    for name, module in placement_units(model):
        size, tied_to = 0, None
        for pname, param in module.named_parameters():
            full = f"{name}.{pname}"
            if full in tied:
                tied_to = tied_to or owner.get(tied[full])
            else:
                owner[full] = name
                size += param.numel() * param.element_size()
        units.append((name, size, tied_to))
    total = sum(size for _, size, _ in units)
    plan: dict[str, int | str] = {}
    d, used, placed = 0, 0, 0
    for name, size, tied_to in units:
        if size == 0 and tied_to is not None:  # its weights live with the module that owns them
            plan[name] = plan[tied_to]
            continue
        fair_end = total * (d + 1) / len(devices)
        over_fair = placed + size / 2 > fair_end and used > 0
        while d < len(devices) - 1 and (used + size > budgets[d] or over_fair):
            d, used, over_fair = d + 1, 0, False
        if used + size > budgets[d]:
            raise IA2Error(
                f"dist.teacher_gpus: the model's weights ({total / 2**30:.2f} GiB in {dtype}) do "
                f"not fit {len(devices)} device(s) with {min(budgets) / 2**30:.2f} GiB for weights "
                f"each; give each teacher replica more GPUs or use model.dtype=bfloat16")
        plan[name] = devices[d]
        used += size
        placed += size
    return plan


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's own special tokens (Llama: BOS; Qwen: none)."""
    if not texts:
        return []
    # verbose=False: lengths are checked against the model's context by the callers, with an
    # actionable error, instead of the tokenizer's generic warning.
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


#: Families whose positions enter only as attention biases (ALiBi) and whose configs state no
#: context length: no position table limits the prompt.
_UNBOUNDED_POSITION_FAMILIES = ("bloom",)


def context_length(model) -> int:
    """The most positions the model (or its config) accepts (max_position_embeddings /
    n_positions / n_ctx)."""
    cfg = getattr(model, "config", model)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                 "seq_length", "max_seq_len"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if getattr(cfg, "model_type", None) in _UNBOUNDED_POSITION_FAMILIES:
        return sys.maxsize
    raise IA2Error(f"model: {type(cfg).__name__} states no context length "
                   f"(max_position_embeddings); set it in the model's config.json")


# --------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------

#: Llama-style attention projection names and the modules that play their role in other families
#: (fused qkv and output projections), looked up only inside the attention sub-modules.
_TARGET_ALIASES = {
    "q_proj": ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack", "q"),
    "k_proj": ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack", "k"),
    "v_proj": ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack", "v"),
    "o_proj": ("c_proj", "dense", "out_proj", "o"),
}


def _is_linear(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def _resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """PEFT target names for ``targets``: each name present in the model is kept; a Llama name that
    is absent maps to its family's equivalent under the attention sub-module ('attn.c_attn')."""
    names = [name for name, _ in model.named_modules()]
    block = decoder_layers(model)[0]
    attn_name = next(n for n, m in block.named_children() if m is _attention_child(block))
    attn_linears = {n for n, m in _attention_child(block).named_children() if _is_linear(m)}
    resolved: list[str] = []
    for target in targets:
        if any(n == target or n.endswith("." + target) for n in names):
            found = [target]
        else:
            found = [f"{attn_name}.{alias}" for alias in _TARGET_ALIASES.get(target, ())
                     if alias in attn_linears]
        if not found:
            available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                if _is_linear(m)})
            raise IA2Error(f"train.adapter.targets: {target!r} matches no module of "
                           f"{type(model).__name__}; available linear modules: "
                           f"{', '.join(available)}")
        resolved.extend(f for f in found if f not in resolved)
    return resolved


def _peft_config(model: nn.Module, adapter_cfg):
    import peft

    kind = adapter_cfg.type
    if kind == "lora":
        return peft.LoraConfig(r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha,
                               lora_dropout=adapter_cfg.dropout, bias="none",
                               target_modules=_resolve_targets(model, adapter_cfg.targets),
                               task_type="CAUSAL_LM")
    if kind == "ia3":
        # input scaling (the reference): every target is a PEFT "feedforward" module, whose
        # learned vector scales the module's input; output scaling: none is
        targets = _resolve_targets(model, adapter_cfg.targets)
        scaling = adapter_cfg.ia3_scaling
        if scaling not in ("input", "output"):
            raise IA2Error(f"train.adapter.ia3_scaling: {scaling!r}; use input or output")
        return peft.IA3Config(target_modules=targets,
                              feedforward_modules=list(targets) if scaling == "input" else [],
                              task_type="CAUSAL_LM")
    if kind == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=adapter_cfg.num_virtual_tokens,
                                       prompt_tuning_init="RANDOM", task_type="CAUSAL_LM")
    if kind == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=adapter_cfg.num_virtual_tokens,
                                       task_type="CAUSAL_LM")
    raise IA2Error(f"train.adapter.type: unknown adapter {kind!r}; use lora, ia3, prompt, prefix "
                   f"or full")


def apply_adapter(model: nn.Module, adapter_cfg, *, seed: int = 0) -> nn.Module:
    """The trainable student: ``model`` wrapped in a PEFT adapter (LoRA, IA3, prompt or prefix
    tuning) whose new weights are initialised from ``seed``, or for 'full' the model itself with
    every parameter trainable. PEFT adapters are injected into ``model`` in place."""
    if adapter_cfg.type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import peft

    config = _peft_config(model, adapter_cfg)
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def _prompt_learning_config(model: nn.Module):
    """The active PEFT prompt-learning config of ``model``, or None."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(model, PeftModel):
        return None
    config = model.active_peft_config
    return config if config.is_prompt_learning else None


def is_prefix_tuned(model: nn.Module) -> bool:
    """True when ``model`` is a PEFT prefix-tuning model (virtual tokens only in the KV cache)."""
    config = _prompt_learning_config(model)
    return config is not None and config.peft_type.value == "PREFIX_TUNING"


def num_prefix_positions(model: nn.Module) -> int:
    """Positions the adapter puts before the prompt, in the output or in the KV cache (prompt and
    prefix tuning: num_virtual_tokens; else 0). Position ids count them."""
    config = _prompt_learning_config(model)
    return 0 if config is None else int(config.num_virtual_tokens)


def num_virtual_tokens(model: nn.Module) -> int:
    """Positions prepended to the model's OUTPUT sequence (logits and captured activations): V for
    prompt tuning, 0 for prefix tuning (its prefixes live in the KV cache), LoRA, IA3 and full."""
    return 0 if is_prefix_tuned(model) else num_prefix_positions(model)


def save_trained(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write the trained part of ``model`` as safetensors: the PEFT adapter (adapter_config.json +
    adapter_model.safetensors) or, for full fine-tuning, the whole model (model.safetensors)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def remove_adapter(student: nn.Module) -> nn.Module:
    """Inverse of ``apply_adapter`` for PEFT adapters: the base model as it was before (LoRA/IA3:
    the injected layers are replaced by the original modules, weights untouched; prompt/prefix
    tuning: the wrapped model). A worker attaches a fresh adapter per job to ONE frozen base
    instead of copying the base (tested: the same results as a fresh copy)."""
    from peft import PeftModel

    if not isinstance(student, PeftModel):
        return student
    if student.active_peft_config.is_prompt_learning:
        base = student.get_base_model()
    else:
        base = student.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base


def attach_trained(base_model: nn.Module, trained_dir: str | os.PathLike) -> nn.Module:
    """The adapter saved in ``trained_dir`` (by ``save_trained``) injected into ``base_model``
    IN PLACE, in eval mode; ``remove_adapter`` gives the base back. For a fully fine-tuned model
    (no adapter_config.json) the model stored there is loaded instead (on ``base_model``'s device
    and dtype; ``base_model`` is not touched)."""
    trained_dir = str(trained_dir)
    param = next(base_model.parameters())
    if os.path.exists(os.path.join(trained_dir, "adapter_config.json")):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, trained_dir).eval()
    from transformers import AutoModelForCausalLM

    attn = getattr(base_model.config, "_attn_implementation", None) or ATTN_IMPLEMENTATION
    model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=param.dtype,
                                                 attn_implementation=attn)
    return model.to(param.device).eval()


# --------------------------------------------------------------------------------------------------
# Last-position shortcuts, each proven once per model against the plain forward
# --------------------------------------------------------------------------------------------------

#: Outcome of each shortcut's one-time check: (shortcut, model structure, kernel, dtype, device)
#: -> mode or None. Whether a shortcut is exact depends on the architecture, never on the weights,
#: so copies of a model (an adapter on a deep copy of the base, each evaluated method) share it.
_PROOFS: dict[tuple, str | None] = {}


def structure_key(model: nn.Module) -> tuple:
    """What determines whether a shortcut is exact for ``model``: its classes (the wrapper's and
    the base model's), its config and any PEFT adapter configs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    peft = repr(sorted((k, repr(v)) for k, v in getattr(model, "peft_config", {}).items()))
    digest = hashlib.sha256((text + peft).encode()).hexdigest()[:16]
    return type(model).__qualname__, type(base).__qualname__, digest


def vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding (from the config when it states it: a ZeRO-3 partitioned
    embedding holds no rows locally)."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(value, int) and value > 0:
        return value
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _probe_batch(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Short inputs for the checks: a left-padded batch of two rows (with its mask) and one
    unpadded row (no mask: sdpa's causal fast path). Token ids are spread over the vocabulary."""
    device = next(model.parameters()).device
    ids = ((torch.arange(14).view(2, 7) * 7919 + 3) % vocab_size(model)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return [(ids, mask), (ids[:1], None)]


class _train_mode_saved:
    """Eval mode (no dropout) inside the context; every module's own training flag restored."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, flag in self.flags:
            module.training = flag


def _probe_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, ctx):
    """(logits at the last position [B, V], per layer the attention output [B, S or 1, D]) of one
    forward of ``model`` inside ``ctx``."""
    from contextlib import ExitStack

    sites = attention_sites(model)
    outs: dict[int, torch.Tensor] = {}

    def keeper(layer):
        def hook(_m, _a, out):
            outs[layer] = (out[0] if isinstance(out, (tuple, list)) else out).float()
        return hook

    with ExitStack() as stack:
        for layer, site in enumerate(sites):
            stack.callback(site.register_forward_hook(keeper(layer)).remove)
        stack.enter_context(torch.no_grad())
        stack.enter_context(ctx)
        kwargs = {} if mask is None else {"attention_mask": mask}
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    return logits[:, -1].float(), [outs[i] for i in range(len(sites))]


#: How many rounding steps of a 16-bit dtype two computations of the same function may differ by,
#: relative to the compared tensor's largest value, one layer deep (``rounding_bound``).
ROUNDING_STEPS = 8


def rounding_bound(dtype: torch.dtype, scale: float, depth: int = 1) -> float:
    """The largest difference that rounding alone explains between two computations of the same
    function in ``dtype`` whose exact values are at most ``scale`` in magnitude, ``depth`` layers
    into the network (1: the first decoder layer's output; L + 1: the logits of an L-layer model).

    Why this separates rounding from a wrong computation:
    - In bfloat16 / float16 every stored tensor (hidden states, q/k/v, attention probabilities, MLP
      activations) is rounded to 8 / 11 significant bits, so the same function computed with other
      shapes (a padded batch, a KV cache, another kernel) differs by a few units of the last place
      of its largest values: at most a few ``eps * scale`` per layer. Each layer adds its own
      rounding to what it inherits; independent roundings add up like a random walk, so the bound
      grows with the square root of the depth. ``ROUNDING_STEPS`` (8) is several times what was
      measured (0 to 1 step on CPU kernels, about 1 step reported on others) so that deeper models
      and other kernels are not rejected for rounding.
    - A wrong shortcut (padding attended to, a stale or misplaced KV cache, a sliding window
      applied to a static cache) changes an attention output by a sizeable fraction of its
      magnitude: measured 48 to 190 steps of bfloat16 in the first layers of two-layer models,
      well beyond the bound (11 steps there). It shows from the first layer it breaks, where the
      bound is tightest.
    - What lies below the dtype's own resolution on the probe cannot be seen in that dtype (and
      does not change what that dtype computes there either): e.g. position ids off by one in a
      random-weight model whose attention is nearly uniform changes its outputs by about one
      bfloat16 step. Such an error is caught in float32, and so it is in 16-bit dtypes once the
      attention is as sharp as a trained model's (queries and keys 4x larger).
    - In float32 (and wider) the rounding of stored tensors is no longer what dominates: the
      accumulation order of long sums differs between kernels by many units of float32's last
      place. There the bound is the fixed ``1e-4 * (1 + scale)``, which every family's shortcuts
      pass (measured: a few float32 steps off) and every wrong shortcut fails by orders of
      magnitude.
    """
    info = torch.finfo(dtype)
    if info.bits >= 32:
        return 1e-4 * (1.0 + scale)
    # below the smallest normal number the spacing of the dtype no longer shrinks with the value
    return ROUNDING_STEPS * depth ** 0.5 * info.eps * max(scale, info.smallest_normal)


def within_rounding(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                    depth: int = 1) -> bool:
    """``got`` equals ``want`` (computed by the reference in the same ``dtype``) up to rounding:
    same shape, finite, and no element further off than ``rounding_bound`` of ``want``'s largest
    magnitude ``depth`` layers deep."""
    if got.shape != want.shape or not torch.isfinite(got).all():
        return False
    if got.numel() == 0:
        return True
    got, want = got.float(), want.float()
    scale = float(want.abs().max())
    return float((got - want).abs().max()) <= rounding_bound(dtype, scale, depth)


def _prove(model: nn.Module, key: nn.Module, name: str, candidates, every_position: bool):
    """The first of ``candidates`` ((mode, context factory) pairs) whose forward reproduces the
    plain one on the probe inputs, or None (logged): the logits at the last position and every
    layer's attention output at the last position (``every_position``: at every real position).
    The outcome is kept per model structure (``structure_key``), attention kernel, dtype and
    device."""
    param = next(model.parameters())
    setting = (name, type(key).__qualname__, structure_key(model),
               getattr(model.config, "_attn_implementation", None), param.dtype, param.device.type)
    if setting in _PROOFS:
        return _PROOFS[setting]
    found, why = None, "no candidate"
    with _train_mode_saved(model):
        try:
            probes = _probe_batch(model)
            plain = [_probe_forward(model, ids, mask, nullcontext()) for ids, mask in probes]
        except Exception as exc:  # no reference to check against: leave the shortcut off
            candidates, why = [], (f"plain forward: {type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0][:120]}")
        for mode, make in candidates:
            try:
                ok = True
                for (ids, mask), (want_logits, want_acts) in zip(probes, plain):
                    logits, acts = _probe_forward(model, ids, mask, make())
                    ok &= within_rounding(logits, want_logits, param.dtype, len(acts) + 1)
                    for depth, (got, want) in enumerate(zip(acts, want_acts), start=1):
                        if every_position:
                            real = (mask if mask is not None else torch.ones_like(ids)).bool()
                            ok &= within_rounding(got[real], want[real], param.dtype, depth)
                        else:
                            ok &= within_rounding(got[:, -1], want[:, -1], param.dtype, depth)
                if ok:
                    found = mode
                    break
                why = f"mode {mode}: differs from the plain forward"
            except Exception as exc:  # any failure of a shortcut means: do not use it
                why = f"mode {mode}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if found is None:
        log.info("%s: the %s shortcut is off for %s (%s); the plain forward is used",
                 type(model).__name__, name, type(key).__name__, why)
    _PROOFS[setting] = found
    return found


def _mlp_child(block: nn.Module) -> nn.Module | None:
    for name in ("mlp", "feed_forward", "block_sparse_moe", "ffn"):
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


class last_position_mlp:
    """Within the context, the LAST decoder block's MLP runs on the last position only.

    For forwards where nothing reads the last block's output at the other positions: a teacher
    prefill (the keys and values cached for decoding come from the blocks' inputs, the captured
    attention outputs from before the MLP, and only the last position's logits are used) and an
    IA2-only student forward (the loss reads attention outputs only). The MLP's (B, 1, D) output
    goes back into the residual sum broadcast (mode 'broadcast') or, for blocks that add it in
    place (Falcon's parallel attention/MLP), as a full-length tensor that is zero except at the
    last position (mode 'padded'); the last position is exact, the others are never read.

    Proven once per model: on first use the shortcut's last-position logits and attention outputs
    are compared with the plain forward's on a short input (``prove``); a mode that differs or
    raises is not used, and with neither the context does nothing (logged). Prove before
    registering capture hooks that expect a particular batch (the check runs forwards)."""

    def __init__(self, model: nn.Module | None):
        self.model, self.mlp, self.mode, self.handles = model, None, None, []
        self.proven = False
        if model is not None:
            try:
                self.mlp = _mlp_child(decoder_layers(model)[-1])
            except ValueError:
                self.mlp = None

    def prove(self) -> str | None:
        """The mode used ('broadcast', 'padded' or None: off)."""
        if not self.proven:
            self.proven = True
            if self.mlp is not None:
                self.mode = _prove(self.model, self.mlp, "last-position MLP",
                                   [(m, lambda m=m: self._apply(m)) for m in ("broadcast",
                                                                             "padded")],
                                   every_position=True)
        return self.mode

    def _apply(self, mode: str):
        clone = last_position_mlp(None)
        clone.mlp, clone.mode, clone.proven = self.mlp, mode, True
        return clone

    def __enter__(self):
        if self.prove() is not None:
            self.handles = [self.mlp.register_forward_pre_hook(_to_last_position,
                                                               with_kwargs=True)]
            if self.mode == "padded":
                self.handles.append(self.mlp.register_forward_hook(_to_full_length))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _to_last_position(module, args, kwargs):
    """Forward pre-hook: the module's first input [B, S, ...] cut to its last position (the full
    length is kept in ``module._ia2_full_len``)."""
    if args:
        module._ia2_full_len = args[0].shape[1]
        return (args[0][:, -1:], *args[1:]), kwargs
    key = next(iter(kwargs))
    module._ia2_full_len = kwargs[key].shape[1]
    return args, {**kwargs, key: kwargs[key][:, -1:]}


def _to_full_length(module, args, output):
    """Forward hook: the last-position output [B, 1, D] (first element of a tuple) placed at the
    last of ``module._ia2_full_len`` positions of a zero tensor."""
    first = output[0] if isinstance(output, tuple) else output
    full = first.new_zeros(first.shape[0], module._ia2_full_len, *first.shape[2:])
    full[:, -1:] = first
    return (full, *output[1:]) if isinstance(output, tuple) else full


_LAST_QUERY = "ia2dist_last_query"


def _last_query_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The wrapped kernel's attention for the LAST query only, broadcast to every query position.

    Exact at the last position: with no mask, sdpa is causal (upper-left aligned), so the last
    query sees the first ``q_len`` keys; with a mask, its last row is that query's row."""
    inner, is_sdpa = module._ia2_inner_attention
    q_len = query.shape[2]
    if q_len == 1 or kwargs.get("position_bias") is not None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None:
        if is_sdpa:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        mask = None
    else:
        mask = attention_mask[..., -1:, :]
    out, weights = inner(module, query[:, :, -1:], key, value, mask, **kwargs)
    # (B, 1, H, hd) -> (B, q_len, H, hd): the module reshapes and projects as usual
    return out.expand(out.shape[0], q_len, *out.shape[2:]), weights


class last_query_attention:
    """Within the context, the LAST decoder block's attention computes its last query only.

    For a teacher prefill, where only the last position of the last block is ever read (the
    captured attention output of the first response token, and the logits that pick it): the
    block's keys and values are computed and cached for every position as usual, but the
    attention of the other queries (O(S^2) work) is skipped; their rows repeat the last one and
    are never read. Where the query and output projections are separate modules (``q_proj``,
    ``o_proj``: Llama, Qwen, Mistral), they run on the last position only as well (the attention
    block's output is then [B, 1, D], broadcast into the residual sum). Used together with
    ``last_position_mlp``. Applies to self-attention modules that dispatch through transformers'
    attention interface with the eager or sdpa kernel (Llama, Qwen, Mistral, GPT-2, GPT-NeoX, ...
    in transformers 5); a no-op for others.

    Proven once per model like ``last_position_mlp`` (with the q/o projections cut, else without,
    else off): an attention whose keys are not what the last query should see (e.g. position
    biases built for the full query length) is caught there and left to the plain forward."""

    def __init__(self, model: nn.Module | None):
        self.attn = self.inner = self.q_proj = self.o_proj = None
        self.handles: list = []
        self.model, self.mode, self.proven, self.active = model, None, False, False
        if model is None:
            return
        try:
            attn = attention_sites(model)[-1]
        except ValueError:
            return
        config = getattr(attn, "config", None)
        forward = getattr(type(attn), "forward", None)
        code = getattr(inspect.unwrap(forward), "__code__", None) if forward else None
        kind = getattr(config, "_attn_implementation", None)
        if (code is None or "ALL_ATTENTION_FUNCTIONS" not in code.co_names
                or kind not in ("eager", "sdpa") or getattr(attn, "reorder_and_upcast_attn", False)
                or getattr(attn, "is_cross_attention", False)):
            return
        if kind == "sdpa":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            inner = ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            inner = getattr(sys.modules.get(type(attn).__module__), "eager_attention_forward", None)
            if inner is None:
                return
        self.attn, self.inner = attn, (inner, kind == "sdpa")
        self.q_proj, self.o_proj = (getattr(attn, "q_proj", None), getattr(attn, "o_proj", None))
        if not (isinstance(self.q_proj, nn.Module) and isinstance(self.o_proj, nn.Module)):
            self.q_proj = self.o_proj = None

    @staticmethod
    def _expand_back(module, args, kwargs, output):
        # the attention module views the queries as [B, S, H, hd]: a broadcast of the last row
        return output.expand(output.shape[0], module._ia2_full_len, *output.shape[2:])

    def prove(self) -> str | None:
        """The mode used ('q/o cut': projections too, 'kernel': the attention only, None: off)."""
        if not self.proven:
            self.proven = True
            if self.attn is not None:
                modes = (["q/o cut"] if self.q_proj is not None else []) + ["kernel"]
                self.mode = _prove(self.model, self.attn, "last-query attention",
                                   [(m, lambda m=m: self._applied(m)) for m in modes],
                                   every_position=False)
        return self.mode

    def _applied(self, mode: str):
        clone = copy.copy(self)
        clone.mode, clone.proven, clone.handles = mode, True, []
        return clone

    def __enter__(self):
        if self.prove() is None:
            return self
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

        if _LAST_QUERY not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(_LAST_QUERY, _last_query_attention_forward)
        self.active = True
        self.config = self.attn.config
        own = copy.copy(self.config)
        # the internal field: the property's setter would also rewrite the shared sub-configs
        own._attn_implementation_internal = _LAST_QUERY
        self.attn._ia2_inner_attention = self.inner
        self.attn.config = own
        if self.mode == "q/o cut":
            self.handles = [
                self.q_proj.register_forward_pre_hook(_to_last_position, with_kwargs=True),
                self.q_proj.register_forward_hook(self._expand_back, with_kwargs=True),
                self.o_proj.register_forward_pre_hook(_to_last_position, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.attn.config = self.config
            del self.attn._ia2_inner_attention
            self.active = False
        for handle in self.handles:
            handle.remove()
        self.handles = []
