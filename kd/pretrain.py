"""Distillation pretraining: config -> data -> models -> engine -> checkpoint, export and logs."""
import json
import logging
import os
import time
from typing import Optional

import numpy as np
import torch

from kd import dist
from kd.checkpoint import Checkpointer, export_dir_for, export_pretrained
from kd.config import to_dict, to_yaml
from kd.config_checks import attention_alphas_on, validate_pretrain
from kd.data.blocks import SPLITS, load_blocks, prepare_blocks
from kd.data.loader import IndexedBlocks, MLMCollate, eval_batches, make_loader
from kd.data.streaming import StreamedBlocks, document_stream_factory
from kd.data.masking import masking_spec_for, rare_token_weights
from kd.engine import Trainer
from kd.optim import autocast_for
from kd.errors import KDError
from kd.integrity import run_identity
from kd.logger import setup_console_logging, write_run_files
from kd.models import (DistillationStudent, build_pruned_student, build_student, count_parameters,
                       default_hidden_map, load_mlm_model, load_teacher, load_tokenizer)
from kd.objective import attention_terms_for, distill_loss, evaluate_mlm, make_plan
from kd.prune import write_ranking
from kd.run_inputs import check_compatible, tokenizer_ref
from kd.teacher_cache.read import CachedTeacherCollate, open_for_training

log = logging.getLogger(__name__)


def hidden_pairs_for(cfg, num_teacher: Optional[int], num_student: int):
    if cfg.loss.alpha_hidden == 0 or num_teacher is None:
        return []
    if cfg.loss.hidden_layer_map:
        pairs = [tuple(p) for p in cfg.loss.hidden_layer_map]
        for pair in pairs:
            if len(pair) != 2 or not (0 <= pair[0] <= num_student and 0 <= pair[1] <= num_teacher):
                raise KDError(f"loss.hidden_layer_map entry {list(pair)} must be [student_idx, teacher_idx] "
                              f"with hidden_states indices in [0, {num_student}] and [0, {num_teacher}]")
        return pairs
    return default_hidden_map(num_teacher, num_student, cfg.loss.hidden_include_embeddings)


def calibration_batches(cfg, train_blocks):
    """student.prune_calibration_batches batches of train.batch_size training blocks, drawn with
    train.seed: the same on every rank, so every rank prunes to the same student."""
    gen = torch.Generator().manual_seed(cfg.train.seed)
    count = min(len(train_blocks), cfg.student.prune_calibration_batches * cfg.train.batch_size)
    picked = torch.randperm(len(train_blocks), generator=gen)[:count].sort().values.tolist()
    blocks = torch.from_numpy(np.asarray(train_blocks[picked], dtype=np.int64))
    return list(blocks.split(cfg.train.batch_size))


def prepare_data(cfg) -> dict:
    """ddp_main.py --prepare-only: build this config's token block cache (with data.streaming, the
    validation blocks only), nothing else: no teacher, no process group. Returns its info.json."""
    validate_pretrain(cfg)
    setup_console_logging()
    tokenizer = load_tokenizer(tokenizer_ref(cfg))
    splits = ("validation",) if cfg.data.streaming else SPLITS
    folder = prepare_blocks(cfg.data, tokenizer, cfg.data.split_seed, splits)
    with open(os.path.join(folder, "info.json")) as fh:
        info = json.load(fh)
    log.info("prepared %s: %s blocks of %d tokens%s", folder, info["blocks"], cfg.data.seq_len,
             "; the training text is read as a stream" if cfg.data.streaming else "")
    return info


def run_pretraining(cfg) -> dict:
    validate_pretrain(cfg)
    return dist.run_in_process_group(cfg.train.device, lambda info: _run(cfg, info))


def _run(cfg, info: dist.DistInfo) -> dict:
    setup_console_logging()
    started = time.time()
    torch.manual_seed(cfg.train.seed + info.rank)
    log_dir = os.path.join(cfg.log_dir, cfg.run_name)
    run_dir = os.path.join(cfg.checkpoint_dir, cfg.run_name)
    log.info("run %s on %s x%d", cfg.run_name, info.device, info.world_size)

    tokenizer = load_tokenizer(tokenizer_ref(cfg))
    # Offline teacher: KD from cached top-k rows; a teacher named in the config is loaded only for
    # a teacher_layers init, and freed with the other no-KD-forward cases below.
    cache = None
    if cfg.teacher_cache.path and cfg.loss.alpha_kd > 0:
        cache = open_for_training(cfg, tokenizer, cfg.teacher.name)
    elif cfg.teacher_cache.path:
        log.info("loss.alpha_kd=0: teacher_cache.path is not used")
    plan_needs_teacher = cache is None and (cfg.loss.alpha_kd > 0 or cfg.loss.alpha_hidden > 0
                                            or bool(attention_alphas_on(cfg.loss)))
    copies_layers = cfg.student.init == "teacher_layers"
    teacher = None
    if plan_needs_teacher or cfg.student.init == "pruned" or (copies_layers and not cfg.student.init_layers_from):
        teacher = load_teacher(cfg.teacher, info.device)
    check_compatible(cfg, tokenizer, teacher)
    if cfg.data.streaming:  # training blocks come on the fly; held-out blocks stay fixed
        train_blocks, (val_blocks,) = None, load_blocks(cfg.data, tokenizer, cfg.data.split_seed, ("validation",))
        log.info("data: training blocks streamed, %d validation blocks of %d tokens", len(val_blocks),
                 cfg.data.seq_len)
    else:
        train_blocks, val_blocks = load_blocks(cfg.data, tokenizer, cfg.data.split_seed)
        log.info("data: %d train / %d validation blocks of %d tokens", len(train_blocks), len(val_blocks),
                 cfg.data.seq_len)
    if cfg.student.init == "pruned":
        student, ranking = build_pruned_student(cfg.student, teacher, calibration_batches(cfg, train_blocks))
        if info.is_main:
            log.info("pruning ranking written to %s", write_ranking(ranking, log_dir))
    else:
        layer_source = teacher
        if copies_layers and cfg.student.init_layers_from:  # layers from another model; freed once copied
            layer_source = load_mlm_model(cfg.student.init_layers_from, "student.init_layers_from",
                                          require_head=True)
            log.info("student layers copied from %s", cfg.student.init_layers_from)
        student = build_student(cfg.student, layer_source, len(tokenizer))
        del layer_source
    if cfg.data.seq_len > student.config.max_position_embeddings:
        raise KDError(f"data.seq_len={cfg.data.seq_len} exceeds the student's max_position_embeddings "
                      f"({student.config.max_position_embeddings}); lower data.seq_len")
    num_teacher = teacher.config.num_hidden_layers if teacher is not None else None
    pairs = hidden_pairs_for(cfg, num_teacher, student.config.num_hidden_layers)
    attention = [] if cache is not None else attention_terms_for(
        cfg.loss, teacher.config if teacher is not None else None, student.config)
    plan = make_plan(cfg.loss, pairs, from_cache=cache is not None, attention_terms=attention,
                     attention_heads=student.config.num_attention_heads)
    if not plan.use_teacher:
        teacher = None  # only needed for the initial weights: free it (no-KD baseline, teacher cache)
    module = DistillationStudent(student, plan.hidden_pairs,
                                 teacher.config.hidden_size if teacher is not None else None,
                                 plan.student_attention_layers)
    log.info("student: %d layers x %d, %.1fM parameters; loss terms %s", student.config.num_hidden_layers,
             student.config.hidden_size, count_parameters(student) / 1e6, list(plan.weights))

    weights = None
    if cfg.data.mask_weighting == "rare":
        weights = rare_token_weights(train_blocks, len(tokenizer), cfg.data.mask_smoothing)
    train_spec = masking_spec_for(tokenizer, cfg.data, token_weights=weights)
    eval_spec = masking_spec_for(tokenizer, cfg.data, static=True)  # the same masks at every eval
    collate, eval_collate = MLMCollate(train_spec), MLMCollate(eval_spec)
    if cache is not None:
        cache.check_blocks(cfg, {"train": train_blocks, "validation": val_blocks})
        cache.verify(cfg.teacher_cache.verify, info.rank, info.world_size)
        collate = CachedTeacherCollate(train_spec, cache, "train")
        eval_collate = CachedTeacherCollate(eval_spec, cache, "validation")
    if cfg.data.streaming:
        loader = StreamedBlocks(document_stream_factory(cfg.data, info.rank, info.world_size), tokenizer,
                                cfg.data.seq_len, cfg.train.batch_size, collate, info.rank, info.world_size)
    else:
        loader = make_loader(IndexedBlocks(train_blocks), cfg.train.batch_size, collate, info.rank,
                             info.world_size, cfg.train.seed, num_workers=cfg.train.num_workers,
                             pin_memory=info.device.type == "cuda")
    val_set = IndexedBlocks(val_blocks)
    if len(val_set) < cfg.train.batch_size * info.world_size:
        raise KDError(f"the validation split has {len(val_set)} blocks, fewer than one global batch "
                      f"({cfg.train.batch_size} x {info.world_size}); use more validation text or a "
                      f"smaller train.batch_size")
    autocast = autocast_for(info.device, cfg.train.amp)

    def eval_fn(model):
        batches = eval_batches(val_set, cfg.train.batch_size, eval_collate, info.rank, info.world_size,
                               cfg.train.eval_batches)
        return evaluate_mlm(model, teacher, batches, plan, info.device, autocast)

    export_dir = export_dir_for(run_dir)

    def export_fn(model, tag=None):
        out = export_dir_for(run_dir, tag)
        export_pretrained(model.student, tokenizer, out)
        log.info("exported student to %s", out)

    fingerprint = {"student": to_dict(cfg.student), "teacher": cfg.teacher.name,
                   "seq_len": cfg.data.seq_len, "hidden_pairs": [list(p) for p in plan.hidden_pairs]}
    if plan.attention_terms:
        fingerprint["attention_terms"] = [t.name for t in plan.attention_terms]
    if cache is not None:  # a run resumes only onto the same cached teacher rows
        fingerprint["teacher_cache"] = cache.content_id
    if cfg.data.streaming:  # its checkpoints hold stream positions, not sample counts
        fingerprint["data_streaming"] = True
    checkpointer = Checkpointer(run_dir, cfg.train.keep_last, fingerprint, run_identity(to_dict(cfg)))
    trainer = Trainer(cfg.train, info, module, lambda model, batch: distill_loss(model, teacher, batch, plan),
                      loader, checkpointer, log_dir, eval_fn=eval_fn, export_fn=export_fn)
    if info.is_main:
        write_run_files(log_dir, to_yaml(cfg), {
            "kind": "pretrain", "run_name": cfg.run_name, "num_parameters": count_parameters(student),
            "device": str(info.device), "world_size": info.world_size, "export_dir": export_dir,
            "teacher": cfg.teacher.name, "seq_len": cfg.data.seq_len,
            **({"teacher_cache": cfg.teacher_cache.path} if cache is not None else {}),
            "global_batch": cfg.train.batch_size * cfg.train.grad_accum * info.world_size})
    trainer.maybe_resume()
    metrics = trainer.fit()
    log.info("done in %.0f s: %s", time.time() - started,
             ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
