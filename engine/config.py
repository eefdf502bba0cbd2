"""`EngineConfig`: built once (CLI, Python API or Serve config) and handed down whole.

Each part of the engine gets only the sub-config it uses: the scheduler its `SchedulerConfig`,
the block manager its `CacheConfig`, the model runner `ModelLoadConfig` and `CacheConfig`,
request admission (stop strings, grammars) its `LimitsConfig`.
Nothing below the entry points reads the environment.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelLoadConfig:
    model: str
    """Directory of a Hugging Face checkpoint (config.json, safetensors, tokenizer.json)."""
    dtype: str = "auto"
    """"auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16"."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu", "cuda" or "cuda:N"."""
    max_model_len: int | None = None
    """Longest sequence (prompt plus output); defaults to the model's max_position_embeddings."""
    expert_impl: str = "auto"
    """Experts' GEMM path: "auto" (grouped where the device runs it), "grouped", "batched" or "reference"."""
    load_format: str = "safetensors"
    """"safetensors" reads the checkpoint; "dummy" fills random weights on the device from `seed`
    (benchmarks of shapes no checkpoint exists for; only config.json and the tokenizer are read)."""
    seed: int = 0
    """Seed of dummy weights."""

    def __post_init__(self) -> None:
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")


@dataclass
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks per rank; None sizes the cache from memory (kv_memory_fraction or kv_cache_memory_bytes)."""
    kv_cache_memory_bytes: int | None = None
    """Bytes for the KV cache when num_blocks is None; None uses kv_memory_fraction of free device memory."""
    kv_memory_fraction: float = 0.85
    """Fraction of the device's free memory (after weights) given to the KV cache, on CUDA."""
    cpu_kv_cache_bytes: int = 1 << 30
    """Default KV cache size on CPU when neither num_blocks nor kv_cache_memory_bytes is set."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of full prompt blocks already computed (hash of the block and its prefix)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    """Most requests running in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens plus prefill chunks). Prompts longer than the
    budget are prefilled in chunks of at most this many tokens."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class ParallelConfig:
    ep_size: int = 1
    """Expert-parallel ranks of one EP group (1 runs in-process; more run as Ray actors, one per
    GPU on CUDA, with attention data-parallel over the same ranks)."""
    ray_address: str | None = None
    """None starts a local Ray instance; "auto" or "ray://host:port" joins a cluster."""
    cpus_per_rank: int = 1
    """CPUs each rank reserves in its placement-group bundle (and its torch threads on the CPU)."""
    step_timeout_s: float = 600.0
    """A step that takes longer is taken for a hung group: the group is replaced."""
    startup_timeout_s: float = 600.0
    """How long the group may take to get its resources, rendezvous and load the model."""
    time_collectives: bool = False
    """Time every all-to-all (CUDA events; for benchmarks)."""
    step_channel: str = "compiled"
    """How the step plan reaches the ranks: "compiled" (a Ray Compiled Graph: shared-memory
    channels set up once, about 0.1-0.6 ms a round trip) or "ray_call" (one actor call per rank
    per step, about 1-2 ms)."""

    def __post_init__(self) -> None:
        if self.ep_size < 1:
            raise ValueError(f"ep_size must be >= 1, got {self.ep_size}")
        if self.cpus_per_rank < 1:
            raise ValueError(f"cpus_per_rank must be >= 1, got {self.cpus_per_rank}")
        if self.step_channel not in ("compiled", "ray_call"):
            raise ValueError(f"step_channel must be 'compiled' or 'ray_call', got {self.step_channel!r}")


@dataclass
class LimitsConfig:
    """How much work one request may ask of the engine: without these caps a single request can
    stall the step loop (a grammar that compiles for minutes) or slow every other request (thousands
    of stop strings). A request over a cap is refused before it is queued, with a ValueError naming
    the setting (an HTTP 400)."""

    max_stop_strings: int = 16
    """Most stop strings per request (OpenAI allows 4)."""
    max_stop_string_chars: int = 256
    """Longest stop string, in characters."""
    grammar_compile_timeout_s: float = 5.0
    """Longest a constraint (JSON schema, regex, grammar, choice, tools) may take to compile. Grammars
    compile in worker processes, never on the step loop; one that takes longer is abandoned (its
    process killed) and the request refused."""
    grammar_compile_workers: int = 1
    """Grammar compiler processes (started on the first constrained request)."""
    grammar_max_bytes: int = 131072
    """Largest constraint text: the JSON schema (or the tools' parameter schemas together), the EBNF
    grammar, or the choices together, in UTF-8 bytes."""
    grammar_max_enum_values: int = 1000
    """Most `enum` values (plus `const`s) in a JSON schema, or choices (OpenAI allows 1000)."""
    grammar_max_regex_chars: int = 4096
    """Longest `guided_regex`, in characters."""

    def __post_init__(self) -> None:
        for name in ("max_stop_strings", "max_stop_string_chars", "grammar_compile_workers", "grammar_max_bytes",
                     "grammar_max_enum_values", "grammar_max_regex_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.grammar_compile_timeout_s > 0:
            raise ValueError(f"grammar_compile_timeout_s must be > 0, got {self.grammar_compile_timeout_s}")


@dataclass
class EngineConfig:
    load: ModelLoadConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
