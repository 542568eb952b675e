"""Small open_clip architectures for teachers trained on the synthetic world, registered with open_clip."""

from __future__ import annotations

from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# 196 patch tokens, like ViT-B/16: at 224 px with patch 16 (`-16`) or at 112 px with patch 8 (`-8`); a 16-64-token
# SparseFormer is the same kind of cut as 64 out of LLaVA-1.5's 576. `synth-vit-t-8` (the default teacher) is the
# one a 2-core CPU trains in 10 minutes: width 64, fixed 2-D sine-cosine positions and average pooling.
TEACHER_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))


def register_teacher_configs() -> None:
    """Make `open_clip.create_model("synth-vit-t-8")` etc. work (idempotent)."""
    if not set(TEACHER_MODELS) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
