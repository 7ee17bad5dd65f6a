"""The fast distillation step computes what the naive (DistilBERT-style) step computes, and the
throughput benchmark that compares them runs and reports in its documented format."""
import json
import re

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from bench.naive_distiller import NaiveWeights, eager_copy, full_mlm_labels, naive_distill_loss
from kd.config import LossConfig, StudentConfig
from kd.data.masking import MaskingSpec, mask_batch
from kd.models import DistillationStudent, build_student, default_hidden_map
from kd.objective import distill_loss, make_plan
from tests.conftest import PY, run_script

VOCAB = 30522
RATIO_LINE = re.compile(r"^ours/naive tokens/s ratio: \d+\.\d\d$")


@pytest.fixture(scope="module")
def models():
    """2x32 teacher, 1-layer student from its layer 0 then perturbed (so every term is non-trivial),
    no dropout; plus eager twins of both with the same weights."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config._attn_implementation = "sdpa"
    teacher = BertForMaskedLM(config).eval().requires_grad_(False)
    student = build_student(StudentConfig(num_layers=1), teacher, VOCAB)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return teacher, student, eager_copy(teacher).eval().requires_grad_(False), eager_copy(student)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(1000, VOCAB, (3, 24), generator=gen)
    blocks[:, 0], blocks[:, -1] = 101, 102
    spec = MaskingSpec(mask_token_id=103, vocab_size=VOCAB, special_ids=(0, 100, 101, 102, 103), seed=3)
    return mask_batch(list(blocks), [0, 1, 2], spec, epoch=0)


def fast_and_naive(models, batch, kd_positions):
    teacher, student, naive_teacher, naive_student = models
    assert student.config._attn_implementation == "sdpa"
    assert naive_student.config._attn_implementation == "eager"
    loss_cfg = LossConfig(kd_positions=kd_positions)
    pairs = default_hidden_map(2, 1, include_embeddings=False)  # [(1, 2)]: the last hidden states
    module = DistillationStudent(student, pairs, teacher_width=32)
    plan = make_plan(loss_cfg, pairs)
    student.zero_grad(set_to_none=True)
    naive_student.zero_grad(set_to_none=True)

    loss, terms = distill_loss(module, teacher, batch, plan)
    loss.backward()
    ids = batch["input_ids"]
    labels = full_mlm_labels(ids, batch["masked_positions"], batch["mlm_labels"])
    naive_loss, naive_terms = naive_distill_loss(naive_student, naive_teacher, ids, torch.ones_like(ids), labels,
                                                 NaiveWeights.from_loss_config(loss_cfg))
    naive_loss.backward()
    return (loss, terms), (naive_loss, naive_terms)


def test_kd_all_positions_matches_naive_terms_and_gradients(models, batch):
    (loss, terms), (naive_loss, naive_terms) = fast_and_naive(models, batch, "all")
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["mlm_ce"], naive_terms["mlm_ce"], **close)
    torch.testing.assert_close(terms["kd_kl"], naive_terms["kd_kl"], rtol=1e-4, atol=1e-6)  # a sum over 30522 ids
    torch.testing.assert_close(terms["hidden_cos_1_2"], naive_terms["hidden_cos"], **close)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-4, atol=1e-6)
    assert naive_terms["kd_kl"].detach().item() > 1e-3 and naive_terms["hidden_cos"].detach().item() > 1e-3  # not trivially 0

    _, student, _, naive_student = models
    naive_grads = dict(naive_student.named_parameters())
    checked = 0
    for name, param in student.named_parameters():
        twin = naive_grads[name]
        if param.grad is None:
            assert twin.grad is None or not twin.grad.any(), name
            continue
        torch.testing.assert_close(param.grad, twin.grad, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == len(naive_grads)


def test_kd_masked_positions_keeps_the_same_mlm_cross_entropy(models, batch):
    (_, terms), (_, naive_terms) = fast_and_naive(models, batch, "masked")
    torch.testing.assert_close(terms["mlm_ce"], naive_terms["mlm_ce"], rtol=1e-5, atol=1e-6)
    # the KL now averages over the masked positions only, so it is a different number
    assert not torch.allclose(terms["kd_kl"], naive_terms["kd_kl"])


def test_benchmark_tiny_preset_writes_its_report(tmp_path):
    out = tmp_path / "bench"
    result = run_script([PY, "bench/distill_throughput.py", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                         "--unfused", "--out", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert RATIO_LINE.match(last), last
    report = json.loads((out / "tiny-cpu.json").read_text())
    assert report["preset"] == "tiny" and report["device"] == "cpu"
    assert report["batch_size"] == 4 and report["seq_len"] == 32
    assert report["matmul_peak_tflops"] > 0
    for name in ("ours", "naive"):
        variant = report["variants"][name]
        for key in ("tokens_per_s", "step_ms", "peak_mem_mb", "mfu"):
            assert isinstance(variant[key], float) and variant[key] > 0, (name, key)
    ratio = report["variants"]["ours"]["tokens_per_s"] / report["variants"]["naive"]["tokens_per_s"]
    assert report["ratio"] == pytest.approx(ratio)
    assert last.endswith(f"{report['ratio']:.2f}")
    equal = report["variants"]["ours-allpos"]["tokens_per_s"] / report["variants"]["naive"]["tokens_per_s"]
    assert report["equal_math_ratio"] == pytest.approx(equal)
    assert result.stdout.strip().splitlines()[-2] == f"equal-math ours/naive tokens/s ratio: {equal:.2f}"
    fused = report["variants"]["ours-allpos"]["tokens_per_s"] / report["variants"]["ours-allpos-unfused"]["tokens_per_s"]
    assert f"fused/unfused ours-allpos tokens/s ratio: {fused:.2f}" in result.stdout.splitlines()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fast_path_uses_bf16_teacher_and_fused_adamw():
    from bench.distill_throughput import PRESETS, OursStep, build_models, make_batch, to_device
    device = torch.device("cuda")
    teacher, module, naive_teacher, _, pairs = build_models(PRESETS["tiny"], device)
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert all(p.dtype == torch.float32 for p in naive_teacher.parameters())
    step = OursStep(module, teacher, pairs, device)
    assert step.optimizer.defaults["fused"] is True
    loss = step.step(to_device(make_batch(4, 32), device))
    assert torch.isfinite(loss)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only behaviour; on a GPU run `make gpu-check` itself")
def test_gpu_check_without_cuda_prints_its_plan_and_exits_0():
    result = run_script([PY, "bench/gpu_check.py"], timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device here" in result.stdout
    assert "--preset bert-large" in result.stdout and "SIGKILL" in result.stdout
