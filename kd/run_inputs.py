"""What a pretraining run reads besides its corpus: which tokenizer, and whether the teacher fits it.

Used by pretraining (kd/pretrain.py) and by teacher-cache generation (kd/teacher_cache/generate.py); it sits
below both, so neither imports the other for it.
"""
import os

from kd.errors import KDError

TOKENIZER_DIR = "tokenizer"  # the subfolder where cache_teacher.py saves the teacher's tokenizer


def tokenizer_ref(cfg) -> str:
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    if cfg.teacher.name:
        return cfg.teacher.name
    if cfg.student.init.startswith("pretrained:"):
        return cfg.student.init.split(":", 1)[1]
    if cfg.teacher_cache.path:  # cache_teacher.py saves the teacher's tokenizer with the cache
        return os.path.join(cfg.teacher_cache.path, TOKENIZER_DIR)
    raise KDError("no tokenizer: set data.tokenizer (or teacher.name, or student.init=pretrained:<path>)")


def check_compatible(cfg, tokenizer, teacher) -> None:
    if teacher is not None:
        if teacher.config.vocab_size != len(tokenizer):
            raise KDError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the "
                          f"tokenizer's ({len(tokenizer)}); use the teacher's own tokenizer (unset data.tokenizer)")
        if cfg.data.seq_len > teacher.config.max_position_embeddings:
            raise KDError(f"data.seq_len={cfg.data.seq_len} exceeds the teacher's max_position_embeddings "
                          f"({teacher.config.max_position_embeddings}); lower data.seq_len")
