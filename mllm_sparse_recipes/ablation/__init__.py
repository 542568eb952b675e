"""The token-budget ablation (`mllm-sparse ablate`): how many image tokens does the LLM need, and are a
SparseFormer's better than pooling's?

For each token budget N (`--budgets`, latent tokens the LLM receives) it trains stock LLaVA models that differ only
in the vision tower. The arms (`--arms`, default: vit sparseformer pooled):

  vit              the teacher ViT's full patch tokens, LLaVA-style (one model, whatever the budgets);
  sparseformer     sparseformer-N: a SparseFormer with N latent tokens bootstrapped from the teacher (`--encoders
                   N=DIR`, or bootstrapped here: `--bootstrap-data`, `--bootstrap-steps`), its CLS token dropped as
                   LLaVA drops a ViT's;
  pooled           pooled-N: the teacher ViT's patch tokens average-pooled to an n×n grid (N must be square);
  visionzip        visionzip-N: the teacher ViT's patches the CLS token attends to most, plus a few contextual
                   tokens merged from the rest (`llava_adapter.visionzip`), trained like every arm (VisionZip's
                   fine-tuned setting);
  m3               m3-N: ONE LLaVA model over the ViT pooled to every budget's grid (M3-style nested scales, N square),
                   trained with each batch at every budget (or `--budgets-per-step` of them) and scored at each N;
  elastic          elastic-N: ONE elastic SparseFormer bootstrapped for all the budgets (`--encoders elastic=DIR`, or
                   here) and ONE LLaVA model trained as m3's, scored at each N: the claim that one model serves every
                   budget, set beside the dedicated arms and M3.

Every arm starts from the same LLM (`--llm`) and is trained with the same data, steps and schedule in LLaVA's two
stages (stage 1: the projector, the LLM frozen; stage 2 from it: the LLM and the projector; the tower frozen), then
scored by `eval-vlm` on `--test-data` after each stage. The report (`OUT/ablation.{json,md}`):

- accuracy of every arm after each stage, by question type and by the size of the object asked about, next to the
  question-only prior (each question answered with its most frequent training answer);
- paired differences on the same answers, with 95% cluster-bootstrap intervals over test records
  (`statistics.paired_difference`): each SparseFormer against every peer of its N (pooled, visionzip, m3), each
  elastic-N against the dedicated SparseFormer, m3 and the pooled arm of its N, and every arm against the ViT;
- vision encode, LLM prefill and time to first token, every trained arm loaded side by side and timed round-robin on
  the same questions (batch 1);
- plots: `ablation_accuracy.png` (accuracy against image tokens, overall and by object size) and
  `ablation_speed.png` (encode, prefill and time to first token against image tokens).

Like the quickstart, a rerun continues where a run stopped (each arm's stages are marked done in
`OUT/arms/ARM/.done/`). The report covers the budgets and arms of the command that wrote it: to add a budget to
a finished ablation, rerun it with the budget added, and the arms trained before are reused. The training settings are
saved with the run, and each arm records what it was built from (`OUT/arms/ARM/arm.json`); a rerun that would train
an arm differently (other data, LLM, schedule, or another encoder for a budget) is refused, naming the difference. A
rerun with another `--eval-limit` only scores the arms again. `train s` in the tables is the wall time of the
training stages (loading, training, saving).

The package, by job: `run` (orchestration: arms, stages, timing; `run(AblationSettings(...))`), `statistics` (scores
and paired cluster-bootstrap comparisons), `report` (Markdown tables), `plots` (accuracy and time against image
tokens). This module holds only the settings and names, so the command line reads them before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import defaults

SIZES = ("small", "medium", "large")
SETTINGS_FILE = "ablation_settings.json"
REPORT_NAME = "ablation"
ARMS = ("vit", "sparseformer", "pooled", "visionzip", "m3", "elastic")
DEFAULT_ARMS = ("vit", "sparseformer", "pooled")
VLM_STAGES = ("stage1", "stage2")  # LLaVA's two training stages, in order
# Settings that decide what an arm learns: a rerun into the same --out must keep them (budgets may be added).
TRAINING_SETTINGS = (
    "teacher", "train_data", "image_folder", "test_data", "llm", "bootstrap_data", "bootstrap_steps",
    "stage1_epochs", "stage2_epochs", "batch_size", "lr", "projector_lr", "stage2_lr", "model_max_length",
    "train_args", "seed",
)  # fmt: skip
ELASTIC = "elastic"  # the elastic arm's folder (OUT/arms/elastic) and its encoder's key in --encoders
ONE_MODEL_ARMS = ("m3", ELASTIC)  # one LLaVA model trained over every budget, scored at each


@dataclass
class AblationSettings:
    """What `mllm-sparse ablate` runs: one field per option of the command (`mllm-sparse ablate --help`)."""

    teacher: str
    budgets: list[int]
    llm: str
    world: Path | None = None
    train_data: Path | None = None
    image_folder: Path | None = None
    test_data: Path | None = None
    encoders: list[str] = field(default_factory=list)  # "N=DIR"
    bootstrap_data: Path | None = None
    bootstrap_steps: int = 2400
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    stage1_epochs: float = 1.0
    stage2_epochs: float = 1.0
    batch_size: int = defaults.VLM_BATCH_SIZE
    lr: float = 0.0
    projector_lr: float = defaults.STAGE1_PROJECTOR_LR
    stage2_lr: float = defaults.STAGE2_LR
    model_max_length: int = 2048
    train_args: str = ""
    budgets_per_step: int | None = None  # None: every budget
    eval_limit: int | None = None
    max_new_tokens: int = 8
    timing_questions: int = 32
    tokenizer_corpus: Path | None = None
    threads: int | None = None
    seed: int = 0
    out: Path = Path("runs/ablation")

    def __post_init__(self) -> None:
        from mllm_sparse.files import paths_as_paths  # here: this module is read by `--help`, before torch loads

        paths_as_paths(self)


def stage_title(stage: str) -> str:
    return stage.replace("stage", "stage ")
