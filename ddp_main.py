"""Distillation pretraining entry point.

    torchrun --nproc_per_node=8 ddp_main.py --config configs/bert_large_to_6l.yaml [key=value ...]
    python ddp_main.py --config configs/demo.yaml          # single process, no torchrun needed
    python ddp_main.py --config C --prepare-only data.num_proc=16   # build the token block cache, then exit
"""
import sys

from kd.config import PretrainConfig, parse_cli
from kd.config_checks import validate_pretrain
from kd.errors import friendly_errors

PREPARE_ONLY = "--prepare-only"


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    prepare_only = PREPARE_ONLY in args
    with friendly_errors():
        cfg = parse_cli(PretrainConfig, [a for a in args if a != PREPARE_ONLY], flags=f"[{PREPARE_ONLY}] ")
        validate_pretrain(cfg)  # contradictions fail before torch and transformers load
        if prepare_only:  # on a CPU node, before the GPU job: no teacher, no process group
            from kd.pretrain import prepare_data
            prepare_data(cfg)
            return
        from kd.pretrain import run_pretraining  # heavy imports only after the config is valid
        run_pretraining(cfg)


if __name__ == "__main__":
    main()
