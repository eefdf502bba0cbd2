"""`EngineConfig`: built once (CLI, Python API or Serve config) and handed down whole.

Each part of the engine gets only the sub-config it uses: the scheduler its `SchedulerConfig`,
the block manager its `CacheConfig`, the model runner `ModelLoadConfig` and `CacheConfig`,
request admission (stop strings, grammars) its `LimitsConfig`.
Nothing below the entry points reads the environment.

These fields are the one definition of the engine's settings (engine/config_fields.py): the
`LLM(...)` keyword arguments, the CLI flags and the Serve config's keys are derived from them,
the docstring under a field is its --help text, and `setting(...)` holds its choices and bounds.
A field added here appears everywhere; tests/test_cli.py freezes the list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from expertmesh.engine.config_fields import check_fields, setting, settings_of, unknown_name_error


@dataclass
class ModelLoadConfig:
    model: str | None = setting(None, path=True)
    """A checkpoint directory (Hugging Face format: config.json, safetensors, tokenizer.json) or a
    Hugging Face repo id (org/name, downloaded into the Hugging Face cache); None: the embedded
    default model."""
    revision: str | None = None
    """Branch, tag or commit of a Hugging Face repo model; default: main."""
    download_dir: str | None = setting(None, path=True)
    """Hugging Face cache directory that repo models are downloaded into; default: $HF_HOME/hub."""
    tokenizer: str | None = setting(None, path=True)
    """Tokenizer directory or Hugging Face repo id, when it is not the model's."""
    chat_template: str | None = setting(None, path=True)
    """Chat template (a file, or the Jinja text itself) used instead of the checkpoint's."""
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"))
    """Weights and activations dtype; auto is bfloat16 on CUDA, float32 on CPU."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    max_model_len: int | None = setting(None, ge=2)
    """Longest sequence (prompt plus output) in tokens; default: the model's max_position_embeddings."""
    expert_impl: str = setting("auto", choices=("auto", "triton", "grouped", "batched", "reference"))
    """Experts' path: auto (the fused Triton MoE on the CUDA kernel path, else grouped where the device
    runs it), triton (the fused MoE; needs the kernel path), grouped (torch grouped_mm), batched or
    reference (a loop over experts, the oracle)."""
    load_format: str = setting("safetensors", choices=("safetensors", "dummy"))
    """safetensors reads the checkpoint; dummy fills random weights of its shapes on the device from
    `seed` (benchmarks of shapes no checkpoint exists for; only config.json and the tokenizer are read)."""
    seed: int = 0
    """Seed of dummy weights (load_format dummy)."""
    kernels: str = setting("auto", choices=("auto", "triton", "torch"))
    """auto: the Triton fast paths on CUDA (fused small ops, paged attention reading the KV cache in
    place, fused MoE); triton: those kernels on any device (on a CPU only in Triton's interpreter);
    torch: the plain-torch reference paths (the oracle)."""
    enforce_eager: bool = False
    """Never replay CUDA graphs of the decode step (vLLM's flag): every step runs eagerly."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class CacheConfig:
    block_size: int = setting(16, ge=1)
    """Tokens per KV-cache block."""
    num_blocks: int | None = setting(None, name="num_kv_blocks", ge=1)
    """KV-cache blocks per rank; wins over gpu_memory_utilization and kv_cache_memory_bytes. Default:
    sized from memory (gpu_memory_utilization on CUDA, 1 GiB on the CPU)."""
    kv_cache_memory_bytes: int | None = setting(None, ge=1)
    """Bytes for the KV cache of each rank, when num_kv_blocks is not given; wins over
    gpu_memory_utilization."""
    gpu_memory_utilization: float = setting(0.9, gt=0.0, le=1.0)
    """Fraction of each GPU's total memory for this engine (weights, activations and KV cache); the KV
    cache gets what the weights and other users of the GPU leave of it. Ignored on the CPU and when
    num_kv_blocks or kv_cache_memory_bytes is given."""
    cpu_kv_cache_bytes: int = setting(1 << 30, ge=1, public=False)
    """KV-cache size on the CPU when neither num_blocks nor kv_cache_memory_bytes is set."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes already computed (full blocks, by hash of the block and
    its prefix)."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SchedulerConfig:
    max_num_seqs: int = setting(256, ge=1)
    """Most requests running in one step."""
    max_num_batched_tokens: int = setting(2048, ge=1)
    """Token budget of one step (decode tokens plus prefill chunks); longer prompts are prefilled in
    chunks of at most this many tokens."""
    async_scheduling: bool = True
    """Schedule and stage each step while the GPU computes the one before (vLLM's --async-scheduling):
    the next step's inputs take the sampled tokens on the device and the host's per-step work hides
    behind the GPU's. One in-process GPU rank only (expert-parallel groups and the CPU run steps one
    after another); a step with a grammar, thinking budget or penalty in flight waits for its tokens."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ParallelConfig:
    ep_size: int = setting(1, ge=1)
    """Expert-parallel ranks of one EP group: 1 runs in-process; more run as Ray actors, one per GPU
    on CUDA (CPU ranks otherwise), with attention data-parallel over the same ranks."""
    sequence_parallel_min_tokens: int | None = setting(None, ge=0)
    """Prompts of at least this many tokens are sharded over every rank of the EP group (sequence-parallel
    attention): each rank holds about 1/ep_size of the sequence's KV cache and computes about 1/ep_size
    of each prefill chunk. 0 turns it off. Default: 32768 when ep_size > 1, off on one rank (a value given
    also shards on one rank, where it runs the same code with no collective and gains nothing)."""
    ray_address: str | None = None
    """Ray cluster to join (auto, host:port or ray://host:port); default: start a local Ray instance.
    `serve` always runs on Ray, generate and chat only with ep_size > 1."""
    cpus_per_rank: float | None = setting(None, gt=0)
    """CPUs each rank reserves in its placement-group bundle, a fraction allowed; default: 1 for a GPU rank,
    0.5 for a CPU rank (an EP group of 4 CPU ranks fits on 2 cores). A CPU rank runs as many torch
    threads, at least one."""
    max_resumptions: int = setting(3, ge=0)
    """Times a request may resume on a fresh EP group after a rank of its group dies (from its prompt and the
    tokens it has produced, so its stream goes on; greedy decoding gives the same tokens); then it ends with
    an error. 0: a rank's death ends the requests in flight."""
    step_timeout_s: float = setting(600.0, gt=0, public=False)
    """A step that takes longer is taken for a hung group: the group is replaced."""
    startup_timeout_s: float = setting(600.0, gt=0, public=False)
    """How long the group may take to rendezvous and load the model."""
    placement_timeout_s: float = setting(60.0, gt=0, public=False)
    """How long the group waits for resources the cluster has but others hold; resources the cluster
    does not have at all fail at once."""
    time_collectives: bool = setting(False, public=False)
    """Time every all-to-all (CUDA events; for benchmarks)."""
    step_channel: str = setting("compiled", choices=("compiled", "ray_call"))
    """How the step plan reaches the ranks: compiled (a Ray Compiled Graph: shared-memory channels set
    up once, about 0.1-0.6 ms a round trip) or ray_call (one actor call per rank per step, about 1-2 ms)."""
    num_redundant_experts: int = setting(0, ge=0)
    """Extra expert slots of an EP group for copies of hot experts, placed by the load balancer (EPLB); each
    rank holds (experts + this) / ep_size slots, so the sum must divide by ep_size. 0: no copies. Needs
    ep_size > 1."""
    eplb_interval: int = setting(0, ge=0)
    """Engine steps between expert load-balancer checks: the expert load counted since the last check is read
    and, in the MoE layers whose ranks are loaded unevenly (eplb_min_imbalance), experts and their copies
    move between ranks before the next step. 0: never (the layout of the start stays). Needs ep_size > 1."""
    eplb_min_imbalance: float = setting(1.1, ge=1.0)
    """A load-balancer check moves a MoE layer's experts only when its busiest rank's load over the mean
    rank load is at least this (1.0 is even) and the new layout lowers it."""

    def __post_init__(self) -> None:
        for name in ("num_redundant_experts", "eplb_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if not isinstance(self.eplb_min_imbalance, (int, float)) or isinstance(self.eplb_min_imbalance, bool) \
                or self.eplb_min_imbalance != self.eplb_min_imbalance:
            raise ValueError(f"eplb_min_imbalance must be a number >= 1.0, got {self.eplb_min_imbalance!r}")
        check_fields(self)
        if (self.num_redundant_experts or self.eplb_interval) and self.ep_size < 2:
            raise ValueError("num_redundant_experts and eplb_interval balance experts over the ranks of an EP "
                             f"group: they need ep_size > 1 (got ep_size {self.ep_size})")

    @property
    def eplb(self) -> bool:
        """Whether the group keeps per-layer layouts the load balancer may change (redundant copies or checks)."""
        return bool(self.num_redundant_experts or self.eplb_interval)


SEQUENCE_PARALLEL_MIN_TOKENS = 32768
"""The default threshold of sequence parallelism on EP groups of more than one rank: Qwen3's native
context (past it YaRN stretches the positions), where one rank's KV cache and attention begin to
dominate a step."""


@dataclass
class LimitsConfig:
    """How much work one request may ask of the engine: without these caps a single request can
    stall the step loop (a grammar that compiles for minutes) or slow every other request (thousands
    of stop strings). A request over a cap is refused before it is queued, with a ValueError naming
    the setting (an HTTP 400)."""

    max_stop_strings: int = setting(16, ge=1)
    """Most stop strings per request (OpenAI allows 4)."""
    max_stop_string_chars: int = setting(256, ge=1)
    """Longest stop string, in characters."""
    grammar_compile_timeout_s: float = setting(5.0, gt=0)
    """Longest a constraint (JSON schema, regex, grammar, choice, tools) may take to compile. Grammars
    compile in worker processes, never on the step loop; one that takes longer is abandoned (its
    process killed) and the request refused."""
    grammar_compile_workers: int = setting(1, ge=1)
    """Grammar compiler processes (started on the first constrained request)."""
    grammar_max_bytes: int = setting(131072, ge=1)
    """Largest constraint text: the JSON schema (or the tools' parameter schemas together), the EBNF
    grammar, or the choices together, in UTF-8 bytes."""
    grammar_max_enum_values: int = setting(1000, ge=1)
    """Most enum values (plus consts) in a JSON schema, or choices (OpenAI allows 1000)."""
    grammar_max_regex_chars: int = setting(4096, ge=1)
    """Longest guided_regex, in characters."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class EngineConfig:
    load: ModelLoadConfig = field(default_factory=ModelLoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """The config of `LLM(**kwargs)`: keyword arguments are the public names of the sub-configs'
        fields (`engine_settings()`); an unknown one is a TypeError naming the closest."""
        known = {s.name: s for s in engine_settings()}
        for name in kwargs:
            if name not in known:
                raise unknown_name_error("LLM()", name, known)
        parts = {}
        for part, sub in SUB_CONFIGS.items():
            parts[part] = sub(**{s.attr: kwargs[s.name] for s in settings_of(sub) if s.name in kwargs})
        return cls(**parts)


SUB_CONFIGS = {"load": ModelLoadConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
               "parallel": ParallelConfig, "limits": LimitsConfig}


def engine_settings() -> tuple:
    """Every public engine setting, in the order of the sub-configs: the `LLM(...)` keyword arguments."""
    return tuple(s for sub in SUB_CONFIGS.values() for s in settings_of(sub))
