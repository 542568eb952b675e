"""The quickstart's plans: how big each stage is. Standard library only, so the command line lists them before torch
loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Plan:
    """How big each stage is."""

    num_images: int  # the world; 80% train, 10% val, 10% test
    teacher_steps: int  # of 32 images
    bootstrap_steps: int  # of 64 images
    llm_question_steps: int  # scene pretraining, phase 1: batches of 64 single questions
    llm_record_steps: int  # phase 2: batches of 16 whole conversations
    stage1_epochs: float  # of llava_train.json: LLaVA's stage 1 (the projector)
    stage2_epochs: float  # and stage 2 (the LLM and the projector)
    eval_records: int  # test conversations scored (0: all)

    HELP: ClassVar[dict[str, str]] = {
        "num_images": "images in the synthetic world (80%% train, 10%% val, 10%% test)",
        "teacher_steps": "the teacher's training steps, of 32 images",
        "bootstrap_steps": "the bootstrap's steps, of 64 images",
        "llm_question_steps": "scene pretraining, phase 1: steps of 64 single questions",
        "llm_record_steps": "scene pretraining, phase 2: steps of 16 whole conversations",
        "stage1_epochs": "epochs of the training conversations in LLaVA's stage 1 (the projector, the LLM frozen)",
        "stage2_epochs": "epochs of the training conversations in LLaVA's stage 2 (the LLM and the projector)",
        "eval_records": "test conversations scored (0: all)",
    }


PLANS = {
    # Every stage at a size where it learns: the teacher's zero-shot accuracy, the encoder's retention of it, the
    # LLM's lookup of objects and the VLM's gain over the question-only prior are all visible (benchmarks/README.md).
    "laptop": Plan(
        num_images=8000,
        teacher_steps=1200,
        bootstrap_steps=1200,
        llm_question_steps=1750,
        llm_record_steps=500,
        # 2 epochs each, not LLaVA's 1: in stage 1 the projected tokens start to be read (the loss falls from ~1.2 to
        # ~0.6) only after ~250 steps at a high rate; stage 2's second epoch added 0.4-1.6 points (benchmarks/README.md)
        stage1_epochs=2.0,
        stage2_epochs=2.0,
        eval_records=300,
    ),
    # Every stage for a few steps: checks an installation end to end; the numbers mean nothing.
    "smoke": Plan(
        num_images=100,
        teacher_steps=3,
        bootstrap_steps=3,
        llm_question_steps=3,
        llm_record_steps=2,
        stage1_epochs=0.25,
        stage2_epochs=0.25,
        eval_records=4,
    ),
}
