"""Typed run configuration: dataclass schema + YAML preset + dotted command-line overrides.

The schema is the single source of truth. OmegaConf structured configs reject unknown keys and
wrong types; we catch those before any model or data is loaded and turn them into a one-line
error that names the key and suggests the closest valid one.
"""
import difflib
import os
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kd.errors import KDError


@dataclass
class TrainConfig:
    """Optimisation and loop settings, shared by pretraining and fine-tuning."""
    max_steps: int = 1000
    epochs: Optional[int] = None        # if set, the run also stops after this many epochs
    batch_size: int = 32                # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "linear"            # linear | cosine | constant (after warmup)
    clip_grad_norm: float = 1.0
    amp: str = "bf16"                   # bf16 | fp16 | none; applies on CUDA only, CPU runs fp32
    eval_every: int = 200               # steps; 0 disables periodic eval (eval still runs at the end)
    eval_every_epoch: bool = False      # fine-tuning evaluates once per epoch
    eval_batches: int = 50              # cap on eval batches per evaluation
    save_every: int = 500               # steps; 0 keeps only the final checkpoint
    keep_last: int = 2                  # checkpoints kept on disk
    log_every: int = 10                 # steps between metric logs (one host sync per log)
    resume: str = "auto"                # auto | none | <checkpoint dir>
    seed: int = 0
    compile: bool = False               # torch.compile the trainable model
    num_workers: int = 0                # DataLoader workers (masking is cheap; 0 is fine on CPU)
    device: str = "auto"                # auto | cpu | cuda
    max_nonfinite_skips: int = 5        # consecutive steps with a non-finite loss/grad before stopping
    # Also export the model (Hugging Face folder <checkpoint_dir>/<run>/export_step_NNNNNN) at these
    # steps: e.g. teachers of increasing quality from one warm-up, for a dose-response study.
    export_steps: List[int] = field(default_factory=list)


@dataclass
class TeacherConfig:
    name: Optional[str] = None          # hub name or local path of a BertForMaskedLM with MLM head
    trust_remote_code: bool = False


@dataclass
class StudentConfig:
    num_layers: int = 6
    hidden_size: Optional[int] = None       # None: the teacher's width
    num_heads: Optional[int] = None         # None: the teacher's (or hidden_size // 64)
    intermediate_size: Optional[int] = None  # None: 4 * hidden_size
    # teacher_layers | pruned | random | pretrained:<path, hub name or packaged-minilm>
    # pruned: the teacher's most important layers, heads, FFN neurons and channels (kd/prune.py)
    init: str = "teacher_layers"
    prune_calibration_batches: int = 8  # train.batch_size blocks each, for the pruning importance
    init_layers: Optional[List[int]] = None  # teacher layers copied by teacher_layers init
    # teacher_layers copies from this model instead of the teacher (same architecture): e.g. the
    # final teacher's layers for a student taught by an earlier, weaker copy of it, so that students
    # of a dose-response share one init and one no-KD twin. None: the teacher.
    init_layers_from: Optional[str] = None


@dataclass
class DataConfig:
    # hub | text | wiki_sample
    source: str = "wiki_sample"
    hub_dataset: str = "wikitext"
    hub_config: str = "wikitext-103-raw-v1"
    train_files: List[str] = field(default_factory=list)       # for source=text (.txt or .jsonl)
    validation_files: List[str] = field(default_factory=list)
    validation_fraction: float = 0.05   # held-out share of documents when no validation split exists
    split_seed: int = 0                 # which documents are held out; apart from train.seed, so runs with
                                        # other seeds are scored on the same held-out text
    tokenizer: Optional[str] = None     # None: the teacher's (or the pretrained student's)
    seq_len: int = 128
    mlm_probability: float = 0.15
    static_masks: bool = False          # same mask for a block in every epoch (teacher cache needs it)
    mask_seed: int = 1234
    mask_weighting: str = "uniform"     # uniform | rare: positions weighted by count^-mask_smoothing (DistilBERT)
    mask_smoothing: float = 0.7         # DistilBERT's mlm_smoothing
    on_bad_bytes: str = "skip"          # skip (counted) | error, for undecodable text files
    cache_dir: str = "cache"
    num_proc: int = 1                   # tokenising processes when the block cache is built (1: this one)
    # Read the training text as a stream (datasets streaming) and build blocks on the fly, each rank
    # its own shard, instead of a block cache: for corpora that do not fit on disk as blocks.
    # Held-out evaluation still uses fixed blocks: the hub's validation split or data.validation_files.
    streaming: bool = False


@dataclass
class LossConfig:
    alpha_mlm: float = 2.0
    alpha_kd: float = 5.0
    alpha_hidden: float = 1.0
    temperature: float = 2.0
    kd_positions: str = "masked"        # masked | all (every non-pad position, as DistilBERT)
    kd_direction: str = "forward"       # forward KL(t||s) | reverse KL(s||t)
    hidden_loss: str = "cosine"         # mse | cosine
    hidden_layer_map: Optional[List[List[int]]] = None  # [[student_idx, teacher_idx], ...], hidden_states indices
    hidden_include_embeddings: bool = False
    kd_loss_scale: Optional[float] = None  # if set, rescale KD terms to this multiple of the MLM loss
    topk_mode: str = "renormalize"      # with teacher_cache.path: renormalize (over the k ids) | lse_tail
    # Attention-based terms (0 = off). Each reads the Q/K/V projections of the layers it compares;
    # attention itself stays on SDPA everywhere (kd.models.capture_qkv).
    alpha_attn_kl: float = 0.0          # MiniLM v1: KL of the self-attention distributions (same head count)
    alpha_relation_kl: float = 0.0      # MiniLM v2: Q-Q, K-K and V-V relation KL, summed (any width, any heads)
    alpha_attn_mse: float = 0.0         # TinyBERT: MSE of attention scores on the hidden-layer map's layers
    relation_heads: int = 16            # MiniLM v2 relation heads: must divide both widths (48-64 in the paper)
    attn_student_layer: Optional[int] = None  # encoder layer (0-based) of the MiniLM terms; None: the last
    attn_teacher_layer: Optional[int] = None  # None: the last (v2 picks an upper-middle one for large teachers)


@dataclass
class TeacherCacheConfig:
    """Offline teacher: cache_teacher.py writes top-k teacher logits; ddp_main.py reads them."""
    path: Optional[str] = None          # cache folder; set for training: KD from it, no teacher forward
    epochs: int = 1                     # mask draws cached; training epoch E uses draw E mod epochs
    topk: int = 64                      # teacher ids / log-probs kept per masked position
    shard_blocks: int = 2048            # blocks per shard file
    batch_size: Optional[int] = None    # generation batch; None: train.batch_size
    verify: str = "once"                # once: sha256 each shard once, then trust unchanged files | always


@dataclass
class PretrainConfig:
    run_name: str = MISSING
    log_dir: str = "logs"
    checkpoint_dir: str = "checkpoints"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    if OmegaConf.is_config(node):  # MISSING values would raise on access; a container keeps "???"
        node = OmegaConf.to_container(node, resolve=False)
    keys = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            keys.append(dotted)
            keys.extend(_all_keys(value, dotted + "."))
    return keys


def _explain(err: OmegaConfBaseException, schema: Any, origin: str) -> KDError:
    """One-line message naming the bad key, with the closest valid keys."""
    key = getattr(err, "full_key", None) or ""
    msg = (getattr(err, "msg", None) or str(err)).strip().splitlines()[0]  # drop OmegaConf's detail lines
    valid = _all_keys(schema)
    hint = ""
    if key and key not in valid:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
        if not close:  # also try the last component on its own
            leaf = key.split(".")[-1]
            close = [k for k in valid if difflib.get_close_matches(leaf, [k.split(".")[-1]], cutoff=0.75)][:3]
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        return KDError(f"unknown config key '{key}' in {origin}.{hint} "
                       f"Valid keys are listed in {OmegaConf.get_type(schema).__module__.replace('.', '/')}.py.")
    return KDError(f"bad value for config key '{key}' in {origin}: {msg}")


def load_config(schema_cls: type, config_path: Optional[str], overrides: List[str]) -> Any:
    """Schema defaults <- YAML preset <- `a.b=value` overrides; validated, read-only."""
    schema = OmegaConf.structured(schema_cls)
    merged = schema
    if config_path:
        if not os.path.isfile(config_path):
            raise KDError(f"config file not found: {config_path}. Presets live in configs/.")
        try:
            preset = OmegaConf.load(config_path)
        except Exception as err:  # YAML syntax errors carry line numbers; keep only that line
            raise KDError(f"cannot parse {config_path}: {str(err).splitlines()[0]}") from None
        try:
            merged = OmegaConf.merge(merged, preset)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, config_path) from None
    for item in overrides:
        if "=" not in item:
            raise KDError(f"override '{item}' is not of the form key=value (e.g. train.lr=3e-4)")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "the command line") from None
    missing = sorted(k for k in OmegaConf.missing_keys(merged))
    if missing:
        raise KDError(f"config key(s) {', '.join(missing)} must be set, e.g. {missing[0]}=my-run")
    OmegaConf.set_readonly(merged, True)
    return merged


def parse_cli(schema_cls: type, argv: List[str], flags: str = "") -> Any:
    """`--config preset.yaml key=value ...` -> validated config. `flags`: the script's own options,
    for the usage line."""
    config_path = None
    overrides = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(f"usage: --config PRESET.yaml {flags}[key=value ...]\n\nkeys and defaults:\n"
                  f"{OmegaConf.to_yaml(OmegaConf.structured(schema_cls))}")
            raise SystemExit(0)
        if arg == "--config":
            if not args:
                raise KDError("--config needs a path, e.g. --config configs/demo.yaml")
            config_path = args.pop(0)
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg.startswith("--"):
            raise KDError(f"unknown option {arg}; use --config PATH and key=value overrides")
        else:
            overrides.append(arg)
    return load_config(schema_cls, config_path, overrides)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
