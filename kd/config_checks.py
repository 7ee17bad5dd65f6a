"""Cross-field checks of a pretraining or fine-tuning config, run before anything heavy loads.

The schema (kd/config.py) types each key on its own; these checks catch what only the combination
of keys decides (a cache with hidden losses, streaming with a teacher cache, export steps beyond the
run, ...), each with a one-line error that names the keys and the fix.
"""
from typing import List

from kd.config import PretrainConfig, TrainConfig
from kd.errors import KDError


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
