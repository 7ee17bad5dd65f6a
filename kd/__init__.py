"""kd: BERT pretrain-then-finetune knowledge distillation in plain PyTorch."""
