"""The single source of truth for every setting: dataclasses, validated in ``__post_init__``.

Precedence when a run is configured: dataclass defaults < ``--config`` YAML file < CLI flags.
The CLI builds its flags from these fields (``help`` in each field's metadata is the ``--help``
text), and the resolved config is written into every brain bundle as ``training_args.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aios_ray.errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _opt(default: Any, help: str, flag: str | None = None, cli: bool = True, negative: str | None = None) -> Any:
    """A dataclass field whose metadata carries the CLI help text (and optional flag names)."""
    return field(default=default, metadata={"help": help, "flag": flag, "cli": cli, "negative": negative})


# The model_type in a bundle's config.json: ``aios_ray.hf.register()`` registers the model under it with transformers.
BUNDLE_MODEL_TYPE = "aios_hrm_actv1"
POS_ENCODINGS = ("rope", "learned", "none")
MODEL_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    """Architecture of the HRM ACTv1 language model (saved as the bundle's ``config.json``)."""

    vocab_size: int = _opt(0, "vocabulary size; 0 means 'take it from the tokenizer'", cli=False)
    max_seq_len: int = _opt(128, "tokens per training sequence (the model predicts token t+1 from <= t)")
    hidden_size: int = _opt(128, "width of the residual stream")
    num_heads: int = _opt(4, "attention heads; must divide --hidden-size")
    expansion: float = _opt(2.0, "FFN width = expansion * hidden * 2/3 (SwiGLU), rounded up to 32")
    h_layers: int = _opt(2, "transformer blocks in the slow, high-level (H) module")
    l_layers: int = _opt(2, "transformer blocks in the fast, low-level (L) module")
    h_cycles: int = _opt(2, "H updates per ACT segment")
    l_cycles: int = _opt(2, "L updates per H update")
    halt_max_steps: int = _opt(2, "most ACT segments per sequence; evaluation always runs all of them")
    halt_exploration_prob: float = _opt(0.1, "probability that a training sequence gets a random minimum "
                                             "number of segments (ACT exploration)")
    halt_epsilon: float = _opt(0.01, "halting reward for text: halting is 'right' when one more segment would "
                                     "lower the sequence's loss by less than this fraction")
    q_continue_discount: float = _opt(0.9, "continuing costs: the Q-continue target is this times the next "
                                            "segment's best Q value, so where stopping now and later end "
                                            "equally well, halting wins")
    one_step_grad: bool = _opt(True, "HRM one-step gradient: all cycles but the last run under no_grad "
                                     "(--no-one-step-grad backpropagates through every cycle)")
    rope_theta: float = _opt(10000.0, "RoPE base frequency")
    use_moe: bool = _opt(True, "sparse Mixture-of-Experts FFNs (--no-moe gives dense SwiGLU FFNs)",
                         negative="--no-moe")
    num_experts: int = _opt(8, "experts per MoE layer")
    num_experts_per_tok: int = _opt(2, "experts each token is routed to (top-k)")
    moe_capacity_factor: float = _opt(1.25, "expert capacity = ceil(factor * tokens * k / experts); "
                                            "tokens over capacity skip the FFN and are counted as dropped "
                                            "(training only: evaluation never drops)")
    moe_dropless: bool = _opt(False, "train without capacity: every routed assignment is computed (grouped "
                                     "matmul with variable group sizes); --moe-capacity-factor is then unused")
    moe_lb_coef: float = _opt(0.01, "weight of the Switch load-balance loss (summed over every MoE call)")
    gradient_checkpointing: bool = _opt(False, "recompute block activations in backward to save memory")
    pos_encodings: str = _opt("rope", "positions: 'rope' (rotary, in attention), 'learned' (a max_seq_len x hidden "
                                      "table added to the token embeddings) or 'none'")
    window_size: int = _opt(0, "sliding-window causal attention: each token attends to at most the last W tokens, "
                               "itself included (0: full causal)")
    use_flash_attn: bool = _opt(False, "PyTorch SDPA's flash kernel where the device has it (CUDA, bf16/fp16, no "
                                       "--window-size); elsewhere SDPA's default, with a one-line notice")
    model_dtype: str = _opt("fp32", "parameter dtype the model is built, trained and saved in: fp32|bf16|fp16 "
                                    "(the optimizer keeps fp32 master weights and moments; fp16 needs --use-gpu)")

    def __post_init__(self) -> None:
        for name in ("max_seq_len", "hidden_size", "num_heads", "h_layers", "l_layers", "h_cycles",
                     "l_cycles", "halt_max_steps", "num_experts", "num_experts_per_tok"):
            _positive(name, getattr(self, name))
        if self.vocab_size < 0:
            raise ConfigError(f"vocab_size must be >= 0, got {self.vocab_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by --num-heads {self.num_heads}")
        if self.pos_encodings not in POS_ENCODINGS:
            raise ConfigError(f"--pos-encodings {self.pos_encodings!r}: expected one of {'|'.join(POS_ENCODINGS)}")
        if self.model_dtype not in MODEL_DTYPES:
            raise ConfigError(f"--model-dtype {self.model_dtype!r}: expected one of {'|'.join(MODEL_DTYPES)}")
        if self.window_size < 0:
            raise ConfigError(f"--window-size must be >= 0 (0: full causal), got {self.window_size}")
        if self.pos_encodings == "rope" and (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"head size {self.hidden_size // self.num_heads} must be even for RoPE")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"--num-experts-per-tok {self.num_experts_per_tok} exceeds "
                              f"--num-experts {self.num_experts}")
        _positive("expansion", self.expansion)
        _positive("moe_capacity_factor", self.moe_capacity_factor)
        _positive("rope_theta", self.rope_theta)
        if not 0.0 <= self.halt_exploration_prob <= 1.0:
            raise ConfigError(f"--halt-exploration-prob must be in [0, 1], got {self.halt_exploration_prob}")
        if not 0.0 < self.q_continue_discount <= 1.0:
            raise ConfigError(f"--q-continue-discount must be in (0, 1], got {self.q_continue_discount}")
        if self.moe_lb_coef < 0:
            raise ConfigError(f"--moe-lb-coef must be >= 0, got {self.moe_lb_coef}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return _round_up(math.ceil(self.expansion * self.hidden_size * 2 / 3), 32)


@dataclass
class TrainConfig:
    """Data, optimisation, logging and run control."""

    model: str | None = _opt(None, "brain bundle to resume, or a local Hugging Face tokenizer/model "
                                   "directory whose tokenizer.json to use")
    tokenizer: str | None = _opt(None, "tokenizer.json file or a directory holding one; default: train a "
                                       "byte-level BPE on the training data")
    tokenizer_vocab_size: int = _opt(4096, "vocabulary size of the BPE trained when no tokenizer is given")
    dataset_file: str | None = _opt(None, ".txt, .jsonl (a 'text' field per line) or a folder of them; "
                                          "default: the shipped sample corpus")
    data: str | None = _opt(None, "a directory written by `aios-ray data prepare`: each worker streams its own Parquet "
                                  "shards of token blocks (memory bounded by one shard + one prefetched, not by "
                                  "the corpus); instead of --dataset-file")
    use_chunked_training: bool = _opt(False, "stream the training data in chunks: --dataset-file is prepared into "
                                             "Parquet shards of --dataset-chunk-size blocks (once; cached by content "
                                             "hash under <bundle-dir>/../datasets) and trained as with --data; each "
                                             "batch then runs in micro-batches of at most --chunk-size tokens")
    chunk_size: int = _opt(2048, "with --use-chunked-training (or --data): tokens per micro-batch (batch_size x "
                                 "max_seq_len is cut into micro-batches of at most this many tokens, gradients "
                                 "accumulated): less activation memory, the same step")
    ascii_only: bool = _opt(False, "drop non-ASCII characters from the training and eval text")
    eval_file: str | None = _opt(None, "held-out text for evaluation; default: the sample corpus' eval split "
                                       "when training on the sample corpus, otherwise none")
    eval_batches: int = _opt(4, "batches per evaluation")
    eval_interval: int = _opt(50, "optimizer steps between evaluations (also at step 0 and at the end)")
    steps: int = _opt(100, "optimizer steps to run (per round with --iterate)")
    batch_size: int = _opt(8, "sequences per micro-batch (per worker)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "cosine schedule ends at lr * this")
    warmup_steps: int = _opt(20, "linear warm-up steps")
    weight_decay: float = _opt(0.01, "AdamW weight decay (not applied to norms, biases, embeddings)")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this (0 disables)")
    auto_adjust_lr: bool = _opt(True, "MoE stability: routers learn at lr * 0.1")
    amp: bool = _opt(False, "bf16 autocast for the forward pass (router and losses stay fp32)")
    use_8bit_optimizer: bool = _opt(False, "bitsandbytes' 8-bit AdamW (needs bitsandbytes installed; not a "
                                           "dependency): less optimizer memory, but every expert steps every step")
    log_file: str | None = _opt(None, "metrics JSONL; default: <bundle>/metrics.jsonl")
    log_interval: int = _opt(10, "steps between progress lines")
    expert_usage_interval: int = _opt(50, "steps between expert_usage events in the metrics log")
    checkpoint_interval: int = _opt(100, "steps between checkpoints (one is always written at the end)")
    keep_checkpoints: int = _opt(2, "newest checkpoints kept under <bundle>/checkpoints")
    brain_name: str = _opt("default", "name of the brain bundle directory")
    bundle_dir: str = _opt("artifacts/brains/actv1", "parent directory of brain bundles")
    iterate: bool = _opt(False, "after --steps, reshuffle and go on, round after round, until the stop file "
                                "appears")
    stop_file: str | None = _opt(None, "when this file appears, finish the current step, checkpoint and stop; "
                                       "default: <bundle>/STOP")
    seed: int = _opt(0, "seed for initialisation, data order and ACT exploration")
    expert_id: str | None = _opt(None, "expert-only training: freeze the base brain --model, add this expert (or "
                                       "continue it, if the registry has its weights) to every MoE layer and train "
                                       "only it and its router row; writes <registry dir>/ID/expert.safetensors")
    default_goal: str | None = _opt(None, "with --expert-id: link the expert to this goal in the goals DB (added "
                                          "when no goal has this text)")
    goal_bias_strength: float = _opt(0.0, "goal-aware routing: added to the router logits of the experts linked to "
                                          "active goals of --db (0: off)")
    goals_db: str | None = _opt(None, "goals DB; default: $AIOS_ARTIFACTS or artifacts, + /aios.db", flag="--db")
    registry: str | None = _opt(None, "expert registry JSON; default: $AIOS_ARTIFACTS or artifacts, "
                                      "+ /experts/registry.json")
    def __post_init__(self) -> None:
        for name in ("eval_interval", "steps", "batch_size", "grad_accum", "lr", "log_interval",
                     "expert_usage_interval", "checkpoint_interval", "keep_checkpoints", "tokenizer_vocab_size"):
            _positive(name, getattr(self, name))
        for name in ("eval_batches", "warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        _positive("chunk_size", self.chunk_size)
        if self.data and self.dataset_file:
            raise ConfigError("--data (a prepared directory) and --dataset-file are two sources: give one")
        if self.tokenizer_vocab_size < 260:
            raise ConfigError(f"--tokenizer-vocab-size must be >= 260 (256 bytes + specials), "
                              f"got {self.tokenizer_vocab_size}")
        _check_name("--brain-name", self.brain_name)
        if not math.isfinite(self.goal_bias_strength):
            raise ConfigError(f"--goal-bias-strength must be finite, got {self.goal_bias_strength}")
        if self.default_goal is not None and not self.expert_id:
            raise ConfigError("--default-goal needs --expert-id (the goal is linked to the expert being trained)")


@dataclass
class StoreConfig:
    """The tiered expert store: one description, handed unchanged to the in-process store, to the store's
    Ray actors (``actors.tier_actors.create_store``), to their shutdown and to ``aios-ray store stats``.

    ``path``, ``name``, ``device`` and the capacities have defaults that depend on the run; ``resolved``
    fills them in once (with the expert count the model reports), before anything is created.
    """

    experts: str = _opt("local", "where MoE experts live: 'local' (in the training process) or 'tiered' (a "
                                 "GPU/DRAM/NVMe store owned by Ray actors; the router stays in the model)")
    capacity_gpu: int = _opt(0, "--experts tiered: hot-tier slots in expert records (0: room for every expert); "
                                "a tier smaller than a step's experts still trains, streaming the rest (slower)")
    capacity_dram: int = _opt(0, "--experts tiered: DRAM-tier capacity in expert records (0: every expert)")
    path: str | None = _opt(None, "--experts tiered: the NVMe store directory; default <bundle>/expert_store",
                            flag="--store-path")
    name: str | None = _opt(None, "--experts tiered: name of the store's Ray actors; default: the brain name",
                            flag="--store-name")
    namespace: str = _opt("aios-ray", "--experts tiered: Ray namespace of the store's actors",
                          flag="--store-namespace")
    device: str = _opt("auto", "--experts tiered: where the hot slots live: 'cpu' (a shared-memory file), "
                               "'cuda' (GPU memory shared by CUDA IPC), or 'auto' (cuda with --use-gpu)",
                       flag="--store-device")
    prefetch: bool = _opt(True, "--experts tiered: prefetch the experts the last steps used (usage history)")
    stats_interval: int = _opt(50, "--experts tiered: steps between store_stats events in the metrics log",
                               flag="--store-stats-interval")
    hot_tiers: str = _opt("auto", "--experts tiered: 'shared' (one hot tier per node, its workers compute on the "
                                  "same slots), 'per-worker' (one hot tier per worker, each with its own copy of "
                                  "the hot experts) or 'auto' (per-worker on GPUs: one per GPU; shared on CPU)",
                          flag="--store-hot-tiers")

    def __post_init__(self) -> None:
        if self.experts not in ("local", "tiered"):
            raise ConfigError(f"--experts {self.experts!r}: expected 'local' or 'tiered'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--store-device {self.device!r}: expected 'auto', 'cpu' or 'cuda'")
        if self.hot_tiers not in ("auto", "shared", "per-worker"):
            raise ConfigError(f"--store-hot-tiers {self.hot_tiers!r}: expected 'auto', 'shared' or 'per-worker'")
        for name in ("capacity_gpu", "capacity_dram"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        _positive("store_stats_interval", self.stats_interval)
        if self.name is not None:
            _check_name("--store-name", self.name)

    @property
    def tiered(self) -> bool:
        return self.experts == "tiered"

    def resolved(self, bundle_root: str | Path, brain_name: str, total_experts: int, use_gpu: bool) -> StoreConfig:
        """Every run-dependent default filled in: the store's path and name, the hot tier's device, and
        capacities of 0 (= every expert) as the model's expert count."""
        device = ("cuda" if use_gpu else "cpu") if self.device == "auto" else self.device
        hot_tiers = ("per-worker" if device == "cuda" else "shared") if self.hot_tiers == "auto" else self.hot_tiers
        return dataclasses.replace(
            self, path=str(Path(self.path or Path(bundle_root) / "expert_store").resolve()),
            name=self.name or brain_name, device=device, hot_tiers=hot_tiers,
            capacity_gpu=self.capacity_gpu or total_experts, capacity_dram=self.capacity_dram or total_experts)

    @property
    def is_resolved(self) -> bool:
        return (self.path is not None and self.name is not None and self.device != "auto"
                and self.capacity_gpu > 0 and self.capacity_dram > 0)

    @property
    def hot_tier_per_worker(self) -> bool:
        """Each worker has its own hot tier (always on GPUs unless 'shared' is asked for)."""
        return self.hot_tiers == "per-worker" or (self.hot_tiers == "auto" and self.device == "cuda")

    def for_node(self, node_id: str) -> StoreConfig:
        """The store of one node of a run whose workers span several: its actors' names and its NVMe directory
        carry the node's id, so that each node keeps (and finds again) its own store."""
        key = node_id[:NODE_KEY_LENGTH]
        return dataclasses.replace(self, name=f"{self.name}-{key}", path=str(Path(str(self.path)) / f"node-{key}"))


ZERO_STAGES = ("none", "zero1", "zero2", "zero3")
# Characters of a Ray node id that name a node's store (``StoreConfig.for_node``): 8 hex digits, as Ray's own logs
# shorten node ids.
NODE_KEY_LENGTH = 8


@dataclass
class ClusterConfig:
    """Where and how wide the job runs on Ray."""

    address: str | None = _opt(None, "Ray cluster address ('auto', 'ray://host:10001'); default: start a "
                                     "local embedded Ray")
    num_workers: int = _opt(1, "Ray Train workers; > 1 trains data-parallel (DDP, gloo on CPU, nccl on GPU)")
    use_gpu: bool = _opt(False, "one GPU per worker")
    cuda_ids: str | None = _opt(None, "GPUs the local embedded Ray may use, e.g. 0,1 (of those visible): implies "
                                      "--use-gpu and, with --num-workers left at 1, one worker per id")
    use_ray: bool = _opt(True, "run on Ray Train (--no-ray: the same training function in this process)",
                         flag="--ray")
    storage_path: str | None = _opt(None, "Ray Train storage for reported checkpoints; default: "
                                          "<bundle>/ray_results")
    verbose: bool = _opt(False, "show Ray Train's own lines on the console (its resource requests, the "
                                "TrainingReport of every report, checkpoint paths); the progress lines show always")
    parallel_independent: bool = _opt(False, "each worker trains its own chunks of the dataset with no gradient "
                                              "exchange (chunk_tracker_state.json in the bundle records finished "
                                              "chunks); the workers' weights are merged into the bundle at the end. "
                                              "--ddp (the default) all-reduces gradients instead",
                                       negative="--ddp")
    dataset_chunk_size: int = _opt(256, "training sequences per dataset chunk: with --parallel-independent the "
                                        "unit a worker claims (the chunk tracker records it when finished); with "
                                        "`data prepare` / --use-chunked-training the blocks per Parquet shard, the "
                                        "unit a worker streams")
    zero_stage: str = _opt("none", "DeepSpeed ZeRO through Ray Train: none|zero1|zero2|zero3 (configs in "
                                   "configs/deepspeed/); gloo on CPU, nccl on GPU")

    def __post_init__(self) -> None:
        if self.cuda_ids is not None:
            self._select_gpus()
        _positive("num_workers", self.num_workers)
        _positive("dataset_chunk_size", self.dataset_chunk_size)
        if self.zero_stage not in ZERO_STAGES:
            raise ConfigError(f"--zero-stage {self.zero_stage!r}: expected one of {'|'.join(ZERO_STAGES)}")
        if self.parallel_independent and self.zero_stage != "none":
            raise ConfigError("--parallel-independent exchanges no gradients, so there is nothing for ZeRO to "
                              "partition: use --ddp with --zero-stage")

    @property
    def gpu_ids(self) -> list[int]:
        """--cuda-ids as integers (validated in ``__post_init__``)."""
        return [int(part) for part in (self.cuda_ids or "").split(",") if part.strip()]

    def _select_gpus(self) -> None:
        """--cuda-ids: the local Ray's GPUs; a cluster's GPUs are its own resources, not picked by index here."""
        if self.address:
            raise ConfigError(f"--cuda-ids {self.cuda_ids} picks GPUs of the local embedded Ray; on a cluster "
                              "(--address) Ray places workers on the cluster's GPUs: use --use-gpu --num-workers N")
        parts = [part.strip() for part in self.cuda_ids.split(",")] if self.cuda_ids else []
        if not parts or not all(part.isdigit() for part in parts):
            raise ConfigError(f"--cuda-ids {self.cuda_ids!r}: expected comma-separated GPU indices >= 0, e.g. 0,1")
        if len(set(map(int, parts))) != len(parts):
            raise ConfigError(f"--cuda-ids {self.cuda_ids!r}: an index is given twice")
        self.use_gpu = True
        if self.num_workers == 1:  # the seed's --cuda-ids alone meant one worker per listed GPU
            self.num_workers = len(parts)


@dataclass
class TrackingConfig:
    """The optional Weights & Biases mirror of the metrics log (the JSONL stays the source of truth).
    Unset names fall back to ``AIOS_WANDB_PROJECT`` / ``AIOS_WANDB_ENTITY``, the mode to ``WANDB_MODE``."""

    wandb: bool = _opt(False, "mirror metrics, the redacted config and the artifacts to Weights & Biases "
                              "(rank 0 only)")
    wandb_project: str | None = _opt(None, "W&B project; default: $AIOS_WANDB_PROJECT, else aios-hrm")
    wandb_entity: str | None = _opt(None, "W&B entity (user or team); default: $AIOS_WANDB_ENTITY")
    wandb_group: str | None = _opt(None, "W&B run group")
    wandb_tags: str | None = _opt(None, "comma-separated W&B tags")
    wandb_run_name: str | None = _opt(None, "W&B run name; default: the brain name")
    wandb_offline: bool | None = _opt(None, "log to a local W&B run directory only (upload later with wandb "
                                            "sync); default: $WANDB_MODE, else online when logged in",
                                      negative="--wandb-online")

    def __post_init__(self) -> None:
        # Resolved here, in the process that parses the flags: a Ray worker on another node lacks this env.
        self.wandb_project = self.wandb_project or os.environ.get("AIOS_WANDB_PROJECT") or "aios-hrm"
        self.wandb_entity = self.wandb_entity or os.environ.get("AIOS_WANDB_ENTITY") or None
        mode = os.environ.get("WANDB_MODE", "").strip().lower()
        if mode == "disabled":
            self.wandb = False
        elif self.wandb_offline is None and mode in ("offline", "dryrun", "online"):
            self.wandb_offline = mode != "online"

    @property
    def tags(self) -> list[str]:
        return [tag.strip() for tag in (self.wandb_tags or "").split(",") if tag.strip()]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.store.tiered and not self.model.use_moe:
            raise ConfigError("--experts tiered needs MoE layers (drop --no-moe)")
        if self.store.tiered and self.cluster.parallel_independent:
            raise ConfigError("--experts tiered with --parallel-independent: each independent worker would need "
                              "its own store; use --ddp")
        if self.cluster.zero_stage != "none":
            self._check_zero()
        self._check_precision()

    def _check_precision(self) -> None:
        """--model-dtype and --use-8bit-optimizer against where and how the run trains."""
        low = self.model.model_dtype != "fp32"
        if self.model.model_dtype == "fp16" and not self.cluster.use_gpu:
            raise ConfigError("--model-dtype fp16 needs --use-gpu: on CPU fp16 weights train slowly and, without "
                              "loss scaling, lose small gradients; use --model-dtype bf16")
        if low and (self.store.tiered or self.cluster.zero_stage != "none"):
            raise ConfigError(f"--model-dtype {self.model.model_dtype} keeps fp32 master weights in this project's "
                              "optimizer, which --experts tiered and --zero-stage replace: use fp32 (with --amp) there")
        if not self.train.use_8bit_optimizer:
            return
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("--use-8bit-optimizer needs bitsandbytes, which is not installed (nor a dependency of "
                              "aios-ray): pip install bitsandbytes, or drop the flag")
        if self.store.tiered or self.cluster.zero_stage != "none" or self.train.expert_id or low:
            raise ConfigError("--use-8bit-optimizer replaces the per-expert AdamW that --experts tiered, "
                              "--zero-stage, --expert-id and --model-dtype bf16/fp16 rely on: drop one of them")

    def _check_zero(self) -> None:
        """ZeRO partitions the model's own parameters and optimizer state across data-parallel workers."""
        stage = self.cluster.zero_stage
        if self.store.tiered:
            raise ConfigError(f"--zero-stage {stage} partitions the model's parameters, but --experts tiered keeps "
                              "the experts outside the model, in the store: use --experts local with ZeRO")
        if not self.cluster.use_ray or self.cluster.num_workers < 2:
            raise ConfigError(f"--zero-stage {stage} partitions training state across data-parallel workers: it "
                              "needs Ray Train with --num-workers 2 or more (not --no-ray)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        sections = SECTIONS
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}")
        built: dict[str, Any] = {}
        for name, section_cls in sections.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{name}' must be a mapping")
            built[name] = build_section(section_cls, values, source)
        return cls(**built)


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "cluster": ClusterConfig,
                             "store": StoreConfig, "tracking": TrackingConfig}


def build_section(section_cls: type, values: dict[str, Any], source: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in {section_cls.__name__}")
    coerced = {key: _coerce(names[key], value, source) for key, value in values.items()}
    return section_cls(**coerced)


def read_yaml_sections(name_or_path: str, expected: str) -> tuple[Path, dict[str, Any]]:
    """A preset name (``configs/NAME.yaml``) or YAML path read as a mapping of sections; ``expected`` names
    them for the error message. Every failure is one line naming the file."""
    path = resolve_preset(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        raise ConfigError(f"{path}: empty config file")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{path}: top level must be a mapping of sections ({expected})")
    return path, data


def load_yaml_config(name_or_path: str) -> dict[str, Any]:
    """Read a preset name (``configs/NAME.yaml``) or a YAML path into nested section dicts."""
    path, data = read_yaml_sections(name_or_path, "model/train/cluster/store/tracking")
    Config.from_dict(data, source=str(path))  # validate early, naming the file
    return data


def resolve_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
        if not path.is_file():
            raise ConfigError(f"--config {name_or_path}: no such file")
        return path
    preset = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
        raise ConfigError(f"--config {name_or_path}: unknown preset (known: {', '.join(known)})")
    return preset


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge: keys in ``override`` win."""
    merged = {name: dict(base.get(name) or {}) for name in SECTIONS}
    for name in SECTIONS:
        merged[name].update(override.get(name) or {})
    return merged


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    if value is None:
        return None
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise TypeError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {f.name}={value!r} is not a valid {kind}") from None


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"--{_flag(name)} must be > 0, got {value}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _check_name(flag: str, name: str) -> None:
    """Names become directory names: refuse anything that could escape the parent directory."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        raise ConfigError(f"{flag} {name!r} is not a plain directory name")
