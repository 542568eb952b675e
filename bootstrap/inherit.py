"""Inheritance: a SparseFormer student whose cortex and head are the last two thirds of a CLIP ViT teacher, or an
existing SparseFormer (ours, or an official release) that goes on learning from its teacher (`start_from`).

Following the paper, the cortex takes teacher blocks N/3 … N−1 and the teacher's final LayerNorm and projection;
the first N/3 blocks (and the patch embedding) are replaced by the new focusing transformer. By default blocks
N/3 … 2N/3−1 are fine-tuned and 2N/3 … N−1, the final norm, the pooling head (SigLIP) and the projection stay
frozen. Teachers: CLIP with CLS or average pooling (open_clip, HF) and SigLIP (no CLS, attention-pooling head).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from mllm_sparse import SparseFormerConfig, SparseFormerModel
from mllm_sparse.configuration import bootstrapped_ops_list

from .teachers import Teacher, TeacherArch


@dataclass
class InheritanceReport:
    """What the student got from its teacher, and what the recipe trains."""

    teacher: str
    layer_map: dict[int, int]  # teacher block → student `layers.{i}` (empty when started from an encoder)
    inherited: list[str]  # parameters copied from the teacher
    initialised_from_teacher: list[str]  # parameters started from teacher values that are not a block copy
    new: list[str]  # freshly initialised parameters (the focusing transformer)
    frozen: list[str]
    trained: list[str]
    started_from: str | None = None  # the SparseFormer the student started from; None: built from the teacher

    def to_dict(self) -> dict:
        return asdict(self)


def student_config(arch: TeacherArch, num_latent_tokens: int, image_size: int = 224, **overrides) -> SparseFormerConfig:
    """The bootstrapped layout sized from the teacher: focusing width = half the teacher's, cortex = 2N/3 blocks."""
    num_cortex = arch.layers - arch.layers // 3
    head_width = arch.width // arch.heads
    focus_width = overrides.pop("focus_width", arch.width // 2)
    kwargs = dict(
        # The paper's 64 early-conv channels, scaled down for tiny teachers whose whole ViT costs less than it.
        conv_dim=min(64, arch.width // 4),
        num_latent_tokens=num_latent_tokens,
        num_sampling_points=16,
        same_token_embedding=True,
        # A CLS token where the teacher has one (inserted before the cortex, initialised from the teacher's).
        cls_token_insert_layer=2 if arch.has_cls else -1,
        width_configs=[focus_width, arch.width] + [arch.width] * num_cortex,
        repeats=[4, 1] + [1] * num_cortex,
        ops_list=bootstrapped_ops_list(num_cortex),
        num_attention_heads=[max(1, focus_width // head_width), arch.heads] + [arch.heads] * num_cortex,
        head_op={"cls": "cls", "avg": "latent_avg", "map": "map"}[arch.pool],
        proj_dim=arch.proj_dim,
        proj_bias=arch.proj_bias,
        mlp_ratio=arch.mlp_ratio,
        ln_eps=arch.ln_eps,
        clip_quick_gelu=arch.act == "quick_gelu",
        gelu_approximate="tanh" if arch.act == "gelu_tanh" else "none",
        pg_inner_dim=128,
        image_mean=arch.mean,
        image_std=arch.std,
        image_size=image_size,
    )
    kwargs.update(overrides)
    return SparseFormerConfig(**kwargs)


def inherit(
    teacher: Teacher, num_latent_tokens: int, trainable_cortex: int | None = None, **config_overrides
) -> tuple[SparseFormerModel, InheritanceReport]:
    """Build a student from `teacher`, copy blocks N/3 … N−1 and the head, and set the freeze policy.

    Args:
        num_latent_tokens: latent tokens (the student outputs one more, the CLS token, when the teacher has one).
        trainable_cortex: how many of the first cortex blocks are fine-tuned (default: half, the paper's split);
            the rest, the final norm and the projection are frozen.
        config_overrides: `SparseFormerConfig` fields, plus `focus_width`.
    """
    arch = teacher.arch
    config = student_config(arch, num_latent_tokens, **config_overrides)
    student = SparseFormerModel(config)
    first = arch.layers // 3
    layer_map = {first + k: layer for k, layer in enumerate(cortex_layers(student))}
    weights = teacher.to_sparseformer(layer_map)
    result = student.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"teacher {teacher.spec}: converted keys the student lacks: {result.unexpected_keys}")
    from_teacher = []
    if arch.has_cls:
        with torch.no_grad():
            student.cls_embedding.weight.copy_(teacher.cls_input().detach().view(1, -1))
        from_teacher.append("cls_embedding.weight")

    freeze_cortex_tail(student, trainable_cortex)
    names = [name for name, _ in student.named_parameters()]
    inherited = sorted(weights)
    report = InheritanceReport(
        teacher=teacher.spec,
        layer_map=layer_map,
        inherited=inherited,
        initialised_from_teacher=from_teacher,
        new=[n for n in names if n not in weights and n not in from_teacher],
        frozen=[n for n, p in student.named_parameters() if not p.requires_grad],
        trained=[n for n, p in student.named_parameters() if p.requires_grad],
    )
    return student, report


def cortex_layers(student: SparseFormerModel) -> list[int]:
    """The `layers.{i}` index of each cortex block, in order."""
    units = len(student.config.width_configs)
    return [student.unit_layer_indices[u] for u in range(student.config.cortex_start, units)]


def freeze_cortex_tail(student: SparseFormerModel, trainable_cortex: int | None = None) -> None:
    """The paper's split: the first `trainable_cortex` cortex blocks (None: half) and everything before them train;
    the later cortex blocks, the final norm, the head and the projection stay frozen."""
    blocks = cortex_layers(student)
    trainable_cortex = len(blocks) // 2 if trainable_cortex is None else trainable_cortex
    if not 0 <= trainable_cortex <= len(blocks):
        raise ValueError(f"trainable_cortex must be in [0, {len(blocks)}], got {trainable_cortex}")
    frozen = tuple(f"layers.{layer}." for layer in blocks[trainable_cortex:]) + ("norm.", "head.", "proj.")
    for name, param in student.named_parameters():
        param.requires_grad_(not name.startswith(frozen))


def start_from(
    encoder: SparseFormerModel, teacher: Teacher, spec: str, trainable_cortex: int | None = None
) -> tuple[SparseFormerModel, InheritanceReport]:
    """`encoder` as the student of `teacher`, with the freeze policy of `inherit`; `spec` names it in the report.

    Raises `ValueError` when the two cannot be aligned: embeddings of different widths, or different pixel
    normalisation (both see the same pixels).
    """
    config, arch = encoder.config, teacher.arch
    ours, theirs = config.proj_dim or config.hidden_size, arch.proj_dim or arch.width
    if ours != theirs:
        raise ValueError(f"--init-from {spec}: its embedding has {ours} dimensions, {teacher.spec}'s {theirs}")
    for name, mine, other in (("mean", config.image_mean, arch.mean), ("std", config.image_std, arch.std)):
        if not torch.allclose(torch.tensor(mine, dtype=torch.float64), torch.tensor(other, dtype=torch.float64)):
            raise ValueError(
                f"--init-from {spec} normalises pixels with {name} {list(mine)}, {teacher.spec} with {list(other)}"
            )
    freeze_cortex_tail(encoder, trainable_cortex)
    report = InheritanceReport(
        teacher=teacher.spec,
        layer_map={},
        inherited=[],
        initialised_from_teacher=[],
        new=[],
        frozen=[n for n, p in encoder.named_parameters() if not p.requires_grad],
        trained=[n for n, p in encoder.named_parameters() if p.requires_grad],
        started_from=spec,
    )
    return encoder, report
