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


def check_choice(value: str, choices: List[str], key: str) -> None:
    if value not in choices:
        raise KDError(f"{key}={value!r} is not one of {choices}")


def validate_data_and_temperature(cfg: PretrainConfig) -> None:
    check_choice(cfg.data.source, ["hub", "text", "wiki_sample"], "data.source")
    if cfg.data.source == "text" and not cfg.data.train_files:
        raise KDError("data.source=text needs data.train_files=[path.txt, ...]")
    if cfg.data.num_proc < 1:
        raise KDError(f"data.num_proc={cfg.data.num_proc} must be >= 1 (1 tokenises in the calling process)")
    if not 0 < cfg.data.mlm_probability < 1:
        raise KDError(f"data.mlm_probability={cfg.data.mlm_probability} must be in (0, 1)")
    if cfg.data.seq_len < 8:
        raise KDError(f"data.seq_len={cfg.data.seq_len} is too short; use at least 8")
    if cfg.loss.temperature <= 0:
        raise KDError(f"loss.temperature={cfg.loss.temperature} must be > 0")


def validate_pretrain(cfg: PretrainConfig) -> None:
    """Cross-field checks that the type system cannot express. Runs before any heavy work."""
    check_choice(cfg.loss.kd_positions, ["masked", "all"], "loss.kd_positions")
    check_choice(cfg.loss.kd_direction, ["forward", "reverse"], "loss.kd_direction")
    check_choice(cfg.loss.hidden_loss, ["mse", "cosine"], "loss.hidden_loss")
    check_choice(cfg.data.on_bad_bytes, ["skip", "error"], "data.on_bad_bytes")
    check_choice(cfg.data.mask_weighting, ["uniform", "rare"], "data.mask_weighting")
    if cfg.data.mask_weighting == "rare" and cfg.teacher_cache.path:
        raise KDError("data.mask_weighting=rare draws masks from corpus token counts, which a teacher cache's "
                      "masks do not use; set data.mask_weighting=uniform, or unset teacher_cache.path")
    validate_train(cfg.train)
    validate_streaming(cfg)
    init = cfg.student.init
    if not (init in ("teacher_layers", "pruned", "random") or init.startswith("pretrained:")):
        raise KDError(f"student.init={init!r}: use teacher_layers, pruned, random or pretrained:<path>")
    if init == "pruned" and not cfg.teacher.name:
        raise KDError("student.init=pruned slices the teacher, but teacher.name is not set: name the teacher "
                      "to prune, or use student.init=random")
    if init == "pruned" and cfg.student.prune_calibration_batches < 1:
        raise KDError(f"student.prune_calibration_batches={cfg.student.prune_calibration_batches} must be >= 1")
    cached = validate_teacher_cache_use(cfg)
    copies_teacher = (init == "teacher_layers" and not cfg.student.init_layers_from) or init == "pruned"
    if cfg.student.init_layers_from and init != "teacher_layers":
        raise KDError(f"student.init_layers_from is for student.init=teacher_layers, not {init!r}; unset one")
    teacher_terms = cfg.loss.alpha_kd > 0 or cfg.loss.alpha_hidden > 0 or bool(attention_alphas_on(cfg.loss))
    needs_teacher = (not cached and teacher_terms) or copies_teacher
    if cached and copies_teacher and not cfg.teacher.name:
        raise KDError("student.init=teacher_layers copies the teacher's weights, so it needs teacher.name even "
                      "with teacher_cache.path (the teacher is loaded for the init only, then freed). Set "
                      "teacher.name to the cached teacher, or use student.init=random or pretrained:<path>.")
    if needs_teacher and not cfg.teacher.name:
        raise KDError("teacher.name is not set, but KD losses or student.init=teacher_layers need a "
                      "teacher. Set teacher.name, or set loss.alpha_kd=0 loss.alpha_hidden=0 and a "
                      "non-teacher student.init for MLM-only training.")
    validate_data_and_temperature(cfg)
    if min(cfg.loss.alpha_mlm, cfg.loss.alpha_kd, cfg.loss.alpha_hidden) < 0:
        raise KDError("loss weights (loss.alpha_*) must be >= 0")
    if cfg.loss.alpha_mlm + cfg.loss.alpha_kd + cfg.loss.alpha_hidden == 0:
        raise KDError("all loss weights are 0: nothing to train. Set loss.alpha_mlm > 0.")
    if cfg.loss.kd_loss_scale is not None and cfg.loss.alpha_mlm == 0:
        raise KDError("loss.kd_loss_scale balances KD terms against the MLM loss, so it needs "
                      "loss.alpha_mlm > 0 (or unset loss.kd_loss_scale)")


def validate_streaming(cfg: PretrainConfig) -> None:
    """data.streaming=true: what a stream of blocks cannot serve is refused here, naming the fix."""
    if not cfg.data.streaming:
        return
    if cfg.data.source == "wiki_sample" or (cfg.data.source == "text" and not cfg.data.validation_files):
        raise KDError("data.streaming=true reads the training text as a stream, so held-out evaluation needs a "
                      "fixed validation source: set data.validation_files, or use data.source=hub (its "
                      "validation split); or set data.streaming=false")
    needs_blocks = {"data.mask_weighting=rare": cfg.data.mask_weighting == "rare",
                    "teacher_cache.path": bool(cfg.teacher_cache.path),
                    "student.init=pruned": cfg.student.init == "pruned",
                    "train.epochs": bool(cfg.train.epochs), "train.num_workers > 0": cfg.train.num_workers > 0}
    for setting, used in needs_blocks.items():
        if used:
            raise KDError(f"{setting} needs the training blocks as a fixed array (token counts, block indices, "
                          f"epochs or loader workers), which data.streaming=true does not have: change {setting} or set "
                          f"data.streaming=false")


ATTENTION_ALPHAS = ("alpha_attn_kl", "alpha_relation_kl", "alpha_attn_mse")


def attention_alphas_on(loss_cfg) -> List[str]:
    """The attention-term weights that are switched on (> 0), by key."""
    return [k for k in ATTENTION_ALPHAS if getattr(loss_cfg, k) > 0]


def validate_teacher_cache_use(cfg: PretrainConfig) -> bool:
    """Training from a teacher cache: what a cache cannot give is refused here. True if one is used."""
    check_choice(cfg.loss.topk_mode, ["renormalize", "lse_tail"], "loss.topk_mode")
    check_choice(cfg.teacher_cache.verify, ["once", "always"], "teacher_cache.verify")
    if not cfg.teacher_cache.path:
        return False
    if cfg.loss.alpha_hidden > 0:
        raise KDError(f"loss.alpha_hidden={cfg.loss.alpha_hidden} but teacher_cache.path is set: hidden-state "
                      f"losses need the teacher's hidden states, and a teacher cache holds only its top-k "
                      f"logits. Set loss.alpha_hidden=0, or unset teacher_cache.path to run the teacher online.")
    attention = attention_alphas_on(cfg.loss)
    if attention:
        raise KDError(f"loss.{attention[0]}={getattr(cfg.loss, attention[0])} but teacher_cache.path is set: attention "
                      f"terms need the teacher's queries and keys, and a teacher cache holds only its top-k logits. "
                      f"Set loss.{attention[0]}=0, or unset teacher_cache.path to run the teacher online.")
    if cfg.loss.kd_positions != "masked":
        raise KDError("loss.kd_positions=all needs the teacher at every position, but a teacher cache holds "
                      "the masked positions only; use loss.kd_positions=masked, or unset teacher_cache.path.")
    return cfg.loss.alpha_kd > 0


def validate_cache_generation(cfg: PretrainConfig) -> None:
    """Checks for cache_teacher.py, before anything heavy is loaded."""
    check_choice(cfg.train.device, ["auto", "cpu", "cuda"], "train.device")
    validate_data_and_temperature(cfg)
    if cfg.data.streaming:
        raise KDError("a teacher cache indexes the blocks of a block cache; data.streaming=true has none: "
                      "set data.streaming=false to generate one")
    tc = cfg.teacher_cache
    if not tc.path:
        raise KDError(f"teacher_cache.path is not set: name the folder to write, e.g. "
                      f"teacher_cache.path={cfg.data.cache_dir}/teacher-{cfg.run_name}")
    if not cfg.teacher.name:
        raise KDError("teacher.name is not set: cache_teacher.py runs the teacher, so it needs one")
    for key in ("epochs", "topk", "shard_blocks"):
        if getattr(tc, key) < 1:
            raise KDError(f"teacher_cache.{key}={getattr(tc, key)} must be >= 1")
    if (tc.batch_size or cfg.train.batch_size) < 1:
        raise KDError("teacher_cache.batch_size must be >= 1")
    if cfg.data.static_masks and tc.epochs > 1:
        raise KDError(f"data.static_masks=true draws one mask per block for every epoch, so "
                      f"teacher_cache.epochs={tc.epochs} would store identical copies; set "
                      f"teacher_cache.epochs=1 or data.static_masks=false")


def validate_train(train: TrainConfig) -> None:
    check_choice(train.amp, ["bf16", "fp16", "none"], "train.amp")
    check_choice(train.schedule, ["linear", "cosine", "constant"], "train.schedule")
    check_choice(train.device, ["auto", "cpu", "cuda"], "train.device")
    for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
        if getattr(train, key) < 1:
            raise KDError(f"train.{key}={getattr(train, key)} must be >= 1")
    if train.keep_last < 1:
        raise KDError("train.keep_last must be >= 1 so a good checkpoint always survives")
    bad = [s for s in train.export_steps if not 0 < s < train.max_steps]
    if bad:
        raise KDError(f"train.export_steps={list(train.export_steps)}: {bad} not in [1, train.max_steps-1="
                      f"{train.max_steps - 1}] (the final model is always exported)")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
