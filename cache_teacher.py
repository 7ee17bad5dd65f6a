"""Offline teacher: run the teacher once over the corpus and cache its top-k logits at the masked positions.

    python cache_teacher.py --config configs/demo.yaml teacher_cache.path=cache/teacher-demo teacher_cache.epochs=2
    torchrun --nproc_per_node=8 cache_teacher.py --config configs/bert_large_to_6l.yaml teacher_cache.path=...

Rerun the same command after an interruption: finished shards are kept (checked by sha256), the
rest are written. Then distil without the teacher in memory:

    python ddp_main.py --config configs/demo.yaml teacher_cache.path=cache/teacher-demo loss.alpha_hidden=0
"""
import sys

from kd.config import PretrainConfig, parse_cli
from kd.errors import friendly_errors


def main(argv=None) -> None:
    with friendly_errors():
        cfg = parse_cli(PretrainConfig, sys.argv[1:] if argv is None else argv)
        from kd.teacher_cache.generate import run_cache_generation  # heavy imports only after the config is valid
        run_cache_generation(cfg)


if __name__ == "__main__":
    main()
