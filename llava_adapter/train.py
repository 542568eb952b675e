"""Training LLaVA-style models with the HF `Trainer` (under `deepspeed` or `torchrun`), LLaVA-compatible arguments.

Stage 1 (`--tune_mm_mlp_adapter True`): only the projector trains; `OUT/mm_projector.safetensors` is all it saves.
Stage 2: the LLM trains (full, or LoRA with `--lora_enable True`) with the projector; the vision tower is frozen,
except its last `--tune_vision_last_k` blocks. Full runs save an HF model folder; LoRA runs save the adapter, the
non-LoRA trainables (`non_lora_trainables.safetensors`) and the base they apply to, and `mllm-sparse merge-lora`
folds them into one model. With an elastic tower, `--budgets 9 16 36 64` runs each batch at every one of those budgets,
one backward over their mean loss (both stages), so one model serves them all; `--budgets_per_step K` runs it at K of
them instead (the smallest and K - 1 drawn by the batch).

`--model_name_or_path` is a LLaVA folder (from `mllm-sparse build-vlm`, a llava-hf checkpoint or a merged model). As
in LLaVA, it may instead be a causal LM with `--vision_tower`; with a LLaVA folder, `--vision_tower` swaps its tower.

`main(argv)` is LLaVA's command line (`scripts/train_vlm.py`); code calls `run(model_args, data_args, training_args)`
with the same three argument groups, built by `arguments({field: value})` (each field named as its option).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoProcessor,
    HfArgumentParser,
    LlavaForConditionalGeneration,
    Trainer,
    TrainingArguments,
    set_seed,
)

from mllm_sparse.checkpoint import load_checked, load_safetensors
from mllm_sparse.files import atomic_dir, atomic_path, fsync_path, normal_modes, write_json
from mllm_sparse.training import DivergenceError

from . import checkpoints
from .budgets import drawn_budgets, vlm_budget
from .conversation import TEMPLATES
from .data import DataCollatorForLlava, LlavaJsonDataset, ModalityLengthGroupedSampler
from .llms import load_llm
from .modeling import (
    build_vlm,
    gathered,
    is_rank_zero,
    load_projector,
    projector_state_dict,
    replace_tower,
    save_projector,
)
from .processing import IMAGE_ASPECT_RATIOS
from .shared_memory import release_allreduce_buffers
from .towers import load_tower, processor_for

logger = logging.getLogger(__name__)

NON_LORA_FILE = "non_lora_trainables.safetensors"
LORA_BASE_DIR = "base"
# LLaVA's `--mm_vision_select_feature` → transformers' `vision_feature_select_strategy`.
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a LLaVA folder, or a causal LM (with --vision_tower)"})
    vision_tower: str | None = field(
        default=None, metadata={"help": "encoder folder or CLIP teacher spec (open_clip:…, hf:…)"}
    )
    pool_tokens: int | None = field(default=None, metadata={"help": "pool a CLIP tower's patch tokens to this many"})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "mlp2x_gelu or linear"})
    mm_vision_select_layer: int | None = field(default=None, metadata={"help": "tower layer to project (e.g. -2)"})
    mm_vision_select_feature: str | None = field(
        default=None, metadata={"help": "patch (drop CLS) or cls_patch (keep all tokens)"}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None, metadata={"help": "stage-1 mm_projector.safetensors (or LLaVA's mm_projector.bin)"}
    )
    tokenizer_corpus: str | None = field(default=None, metadata={"help": "tiny LLMs: tokenizer training text"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "LLaVA-format JSON"})
    image_folder: str | None = field(default=None, metadata={"help": "root of the records' image paths"})
    image_aspect_ratio: str = field(default="pad", metadata={"help": f"one of {IMAGE_ASPECT_RATIOS}"})
    version: str = field(default="vicuna_v1", metadata={"help": f"conversation template: {', '.join(TEMPLATES)}"})
    skip_bad_records: bool = field(default=False, metadata={"help": "skip (and count) bad records instead of failing"})
    budgets: list[int] | None = field(
        default=None,
        metadata={
            "help": "an elastic tower: train at these latent-token counts, each batch at all of them or at "
            "--budgets_per_step of them (drawn by the seed and the batch), so the projector and LLM learn them all "
            "(default: the tower's default budget only)"
        },
    )
    budgets_per_step: int | None = field(
        default=None,
        metadata={
            "help": "with --budgets: run each batch at this many of them, the smallest always and the rest drawn, "
            "one backward over their mean loss (default: all of them, M3's recipe; time and activation memory grow "
            "with it; 1: one drawn per batch, the cheapest)"
        },
    )

    def __post_init__(self):
        if self.budgets and self.budgets_per_step is None:
            self.budgets_per_step = len(set(self.budgets))  # the default, every budget, as the count it is
        if self.budgets_per_step is not None and not self.budgets:
            raise ValueError(f"--budgets_per_step {self.budgets_per_step}: give the --budgets to draw them from")


@dataclass
class VlmTrainingArguments(TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "truncate longer sequences (never mid-image)"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    tune_vision_last_k: int = field(default=0, metadata={"help": "stage 2: also train the tower's last k blocks"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "projector learning rate (default: lr)"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "batches of one modality and length"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    remove_unused_columns: bool = False
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "start afresh in an --output_dir that holds an earlier run, deleting its checkpoints (default: "
            "resume from its newest complete checkpoint, as LLaVA does, or refuse if it holds a finished run)"
        },
    )


# The three argument groups of a run, as `HfArgumentParser` gives them to LLaVA's `train.py`.
TrainArguments = tuple[ModelArguments, DataArguments, VlmTrainingArguments]
ARGUMENT_TYPES = (ModelArguments, DataArguments, VlmTrainingArguments)


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: VlmTrainingArguments) -> None:
    """Raise `ValueError` for arguments that contradict each other or name no template or feature."""
    if data_args.version not in TEMPLATES:
        raise ValueError(f"--version must be one of {TEMPLATES}, got {data_args.version!r}")
    if model_args.mm_vision_select_feature not in (None, *SELECT_FEATURES):
        raise ValueError(f"--mm_vision_select_feature must be one of {sorted(SELECT_FEATURES)}")
    if training_args.tune_mm_mlp_adapter and training_args.lora_enable:
        raise ValueError("--tune_mm_mlp_adapter (stage 1) and --lora_enable (stage 2) exclude each other")
    if training_args.learning_rate == 0 and not training_args.mm_projector_lr:
        raise ValueError("--learning_rate 0 without a --mm_projector_lr: nothing would train")
    if training_args.learning_rate == 0 and training_args.lora_enable:
        raise ValueError("--learning_rate 0 with --lora_enable: the LoRA adapters would never move")


def parse_args(argv: list[str] | None) -> TrainArguments:
    """LLaVA's command line (`scripts/train_vlm.py`) → the three argument groups, checked."""
    parser = HfArgumentParser(ARGUMENT_TYPES)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    check_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def arguments(values: Mapping[str, Any]) -> TrainArguments:
    """The three argument groups from field name → value (each name a field of one of them, as on the command line
    without its dashes), checked. The same values give the same groups as `parse_args` of their command line."""
    names = {f.name for group in ARGUMENT_TYPES for f in dataclasses.fields(group) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"not training arguments: {', '.join(unknown)}")
    groups = tuple(
        group(**{f.name: values[f.name] for f in dataclasses.fields(group) if f.init and f.name in values})
        for group in ARGUMENT_TYPES
    )
    check_arguments(*groups)
    return groups


def parse_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """The arguments given in `argv` (LLaVA's spelling, e.g. ["--bf16", "True"]) as field name → value, converted as
    `parse_args` converts them; nothing for those not given. For recipes that pass a user's extra arguments on."""
    parser = HfArgumentParser(ARGUMENT_TYPES)
    for action in parser._actions:
        if action.dest != "help":
            action.default, action.required = argparse.SUPPRESS, False
    given, unused = parser.parse_known_args(list(argv))
    if unused:
        raise ValueError(f"Some specified arguments are not used by the HfArgumentParser: {unused}")
    return vars(given)


def is_llava_folder(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def load_model(model_args: ModelArguments, data_args: DataArguments):
    """(model, processor, assembled): assembled is True when the model was put together here rather than loaded."""
    strategy = SELECT_FEATURES.get(model_args.mm_vision_select_feature)
    layer = model_args.mm_vision_select_layer
    if is_llava_folder(model_args.model_name_or_path):
        model = load_checked(
            LlavaForConditionalGeneration.from_pretrained,
            model_args.model_name_or_path,
            what="LLaVA model",
            model_types=("llava",),
        )
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
        if model_args.vision_tower is None:
            return model, processor, False
        tower = load_tower(model_args.vision_tower, model_args.pool_tokens)
        model = replace_tower(model, tower.model, model_args.mm_projector_type, layer, strategy)
        tokenizer = processor.tokenizer
    else:
        if model_args.vision_tower is None:
            raise ValueError(
                f"{model_args.model_name_or_path} is not a LLaVA folder; give --vision_tower to build one from it"
            )
        tower = load_tower(model_args.vision_tower, model_args.pool_tokens)
        llm, tokenizer = load_llm(model_args.model_name_or_path, model_args.tokenizer_corpus)
        model = build_vlm(tower.model, llm, tokenizer, model_args.mm_projector_type, layer, strategy)
    return model, processor_for(tower, tokenizer, model.config, data_args.image_aspect_ratio), True


def vision_blocks(tower: nn.Module) -> list[nn.Module]:
    """The tower's blocks in order: SparseFormer units, or a CLIP encoder's layers."""
    if hasattr(tower, "layers"):
        return list(tower.layers)
    vit = getattr(tower, "vit", tower)
    encoder = getattr(vit, "vision_model", vit).encoder
    return list(encoder.layers)


def trains_projector_alone(args: VlmTrainingArguments) -> bool:
    """Stage 1 (`--tune_mm_mlp_adapter`), or `--learning_rate 0`: the projector is all that trains."""
    return bool(args.tune_mm_mlp_adapter) or args.learning_rate == 0


def set_trainable(model: LlavaForConditionalGeneration, args: VlmTrainingArguments) -> None:
    """The freeze policy: stage 1 trains the projector; stage 2 also the LLM (unless LoRA adds its own trainables)
    and optionally the tower's last k blocks. `--learning_rate 0` with a `--mm_projector_lr` also trains the projector
    alone (and saves a full model): weights at a zero rate never move, so they are frozen, which spares their
    gradients and keeps them out of the gradient-norm clip."""
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if trains_projector_alone(args):
        return
    if not args.lora_enable:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if args.tune_vision_last_k > 0:
        for block in vision_blocks(model.model.vision_tower)[-args.tune_vision_last_k :]:
            block.requires_grad_(True)


def apply_lora(model: LlavaForConditionalGeneration, args: VlmTrainingArguments):
    """LoRA on the LLM's linear layers only (not the tower, not the projector, not lm_head)."""
    from peft import LoraConfig, get_peft_model

    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.model.language_model.named_modules()
            if isinstance(module, nn.Linear)
        }
    )
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        bias=args.lora_bias,
        # A regex over full names keeps LoRA inside the language model even where the tower has same-named linears.
        target_modules=rf"model\.language_model\..*\.({'|'.join(targets)})",
        task_type="CAUSAL_LM",
    )
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    peft_model = get_peft_model(model, config)
    # get_peft_model freezes everything but the adapters; the projector (and tower blocks) stay trainable.
    for name, param in peft_model.base_model.model.named_parameters():
        if name in trainable:
            param.requires_grad_(True)
    return peft_model


def trainable_state_dicts(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA weights under the PeftModel's keys, other trainables under the base model's keys), gathered first
    under ZeRO-3 (collective: every rank calls it), where peft's own `save_pretrained` would write empty shards."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with gathered(list(params.values())):
        state = {n: p.detach().cpu().clone().contiguous() for n, p in params.items()}
    lora = {n: v for n, v in state.items() if "lora_" in n}
    prefix = "base_model.model."
    other = {n.removeprefix(prefix): v for n, v in state.items() if "lora_" not in n}
    return lora, other


def agreed(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on any rank: every rank takes the same branch, so none waits forever in a collective."""
    if not torch.distributed.is_initialized():
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of this rank's parameters holding a NaN or an infinity (the local shard under ZeRO-3)."""
    bad = []
    for name, param in model.named_parameters():
        local = getattr(param, "ds_tensor", param)
        if local.numel() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


class VlmTrainer(Trainer):
    """`Trainer` with a projector learning rate, modality-grouped batches, checkpoints marked complete once every rank
    has written them, exact weight restore on resume, and a stop on a non-finite loss or gradient before anything
    from that step is saved."""

    def last_good_checkpoint(self) -> str:
        found = checkpoints.latest_complete(Path(self.args.output_dir))
        return str(found) if found else "none (no complete checkpoint yet)"

    def diverged(self, what: str) -> DivergenceError:
        return DivergenceError(
            f"{what} at step {self.state.global_step + 1}; stopped before saving it. Last good checkpoint: "
            f"{self.last_good_checkpoint()}. Lower the learning rate (or check the data) and resume from there."
        )

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The batch's budget (an elastic tower's, drawn by the collator) holds for its forward and backward passes.
        with vlm_budget(model, inputs.pop("num_latent_tokens", None)):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with vlm_budget(model, inputs.pop("num_latent_tokens", None)):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        more = inputs.pop("more_budgets", [])
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        if more:
            # The same records at further budgets, one backward over the mean (one DeepSpeed step per batch).
            losses = [loss]
            for extra in more:
                at = {**inputs, **{k: v for k, v in extra.items() if k != "num_latent_tokens"}}
                with vlm_budget(model, extra["num_latent_tokens"]):
                    losses.append(super().compute_loss(model, at, num_items_in_batch=num_items_in_batch))
            loss = torch.stack(losses).mean()
            result = (loss, result[1]) if return_outputs else loss
        # Checked before backward (a NaN must not reach the optimizer or a checkpoint), on every rank together.
        if agreed(not bool(torch.isfinite(loss.detach()).all()), loss.device):
            raise self.diverged(f"the loss became {loss.item()}")
        return result

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            raise self.diverged(f"the gradient norm became {float(grad_norm)}")
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def check_weights_finite(self) -> None:
        bad = non_finite_parameters(self.model)
        if agreed(bool(bad), self.args.device):
            raise self.diverged(f"non-finite weights ({', '.join(bad[:5]) or 'on another rank'})")

    def _save_checkpoint(self, model, trial) -> None:
        self.check_weights_finite()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # older checkpoints go only once this one is marked complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        if _is_peft(self.model):
            # peft's checkpoint holds the adapter alone; the projector (and tower blocks) train too.
            _, other = trainable_state_dicts(self.model)
            if is_rank_zero():
                with atomic_path(folder / NON_LORA_FILE) as tmp:
                    save_file(other, str(tmp))
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank's shards are written
        if is_rank_zero():  # one writer: a rank listing the folder while another renames its marker into it failed
            checkpoints.mark_complete(folder)
            if limit:
                from transformers.trainer_utils import rotate_checkpoints

                rotate_checkpoints(
                    output_dir=str(folder.parent),
                    save_total_limit=limit,
                    best_model_checkpoint=self.state.best_model_checkpoint,
                    use_mtime=True,
                )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        model = self.model if model is None else model
        folder = Path(resume_from_checkpoint)
        if _is_peft(model):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            other = load_safetensors(folder / NON_LORA_FILE)
            result = model.base_model.model.load_state_dict(other, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"{folder / NON_LORA_FILE}: keys the model lacks: {result.unexpected_keys[:10]}")
            return
        checkpoints.load_full_weights(model, folder)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.args.mm_projector_lr is not None:
            decay = set(self.get_decay_parameter_names(self.model))
            groups = []
            for is_projector in (False, True):
                for with_decay in (True, False):
                    params = [
                        p
                        for n, p in self.model.named_parameters()
                        if p.requires_grad
                        and ("multi_modal_projector" in n) == is_projector
                        and (n in decay) == with_decay
                    ]
                    if params:
                        group = {"params": params, "weight_decay": self.args.weight_decay if with_decay else 0.0}
                        if is_projector:
                            group["lr"] = self.args.mm_projector_lr
                        groups.append(group)
            optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _get_train_sampler(self, train_dataset=None):
        if not self.args.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths,
            batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )


def publish(staging: Path, out: Path) -> None:
    """Move a finished output folder's files into `out`, each by one rename and the weights last, so a kill never
    leaves weights beside missing or half-written companions."""
    normal_modes(staging)
    fsync_path(staging)
    files = sorted(staging.iterdir(), key=lambda f: f.suffix == ".safetensors" or f.name.endswith(".index.json"))
    for file in files:
        os.replace(file, out / file.name)
    fsync_path(out)
    staging.rmdir()


def save_outputs(trainer: VlmTrainer, model, processor, model_args, training_args, assembled: bool) -> None:
    """Final outputs: the projector (stage 1), adapter + non-LoRA trainables + base (LoRA), or a full model, written
    into a staging folder and then published into OUT (see `publish`).

    Every rank takes part (gathering ZeRO-3 partitions is collective); only rank 0 writes.
    """
    out = Path(training_args.output_dir)
    rank0 = is_rank_zero()
    trainer.check_weights_finite()
    if training_args.tune_mm_mlp_adapter:
        state = projector_state_dict(model)
        if rank0:
            save_projector(state, model.config, out)
        return
    staging = out / ".final.tmp"
    if rank0:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the staging folder exists before any rank writes into it
    if training_args.lora_enable:
        lora, other = trainable_state_dicts(model)
        if rank0:
            model.save_pretrained(staging, state_dict=lora)
            save_file(other, str(staging / NON_LORA_FILE))
            base = str(out / LORA_BASE_DIR) if assembled else model_args.model_name_or_path
            write_json(staging / "lora_base.json", {"base": base})
    else:
        # the Trainer gathers ZeRO-3 weights (stage3_gather_16bit_weights_on_model_save)
        trainer.save_model(str(staging))
    if rank0:
        processor.save_pretrained(staging)
        publish(staging, out)


def run_settings(model_args, data_args, training_args) -> dict:
    """Everything that decides the trained weights (and some that does not: see `checkpoints.HARMLESS_SETTINGS`)."""
    settings = {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args)}
    settings.update({k: v for k, v in training_args.to_dict().items() if not k.startswith("_")})
    settings["world_size"] = training_args.world_size  # the global batch depends on it
    return settings


def prepare_output_dir(model_args, data_args, training_args) -> Path | None:
    """Decide between resuming and starting afresh (see `checkpoints.resolve_resume`), check the settings against
    the recorded ones, and say what happens. Returns the checkpoint to resume from."""
    out = Path(training_args.output_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0  # the launcher's rank: no process group exists yet
    resume = checkpoints.resolve_resume(out, training_args.resume_from_checkpoint, training_args.overwrite_output_dir)
    if training_args.overwrite_output_dir and main_process and checkpoints.checkpoints(out):
        logger.warning("--overwrite_output_dir: deleting the earlier run's checkpoints in %s", out)
        checkpoints.clear_progress(out)
    settings = run_settings(model_args, data_args, training_args)
    changed = checkpoints.check_settings(out, settings, resuming=resume is not None, write=main_process)
    if resume is not None and main_process:
        logger.warning("resuming from %s%s", resume, f" (changed: {'; '.join(changed)})" if changed else "")
    return resume


def run(model_args: ModelArguments, data_args: DataArguments, training_args: VlmTrainingArguments) -> None:
    """Train as `scripts/train_vlm.py` does with the same arguments (see the module docstring): into
    `training_args.output_dir`, resuming from its newest complete checkpoint, or refusing, as the command line does."""
    checkpoints.force_weights_only_loads()
    check_arguments(model_args, data_args, training_args)
    if not torch.accelerator.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin for; torch warns on every epoch otherwise
    resume = prepare_output_dir(model_args, data_args, training_args)  # sets up the devices and process group
    release_allreduce_buffers()
    set_seed(training_args.seed)  # a new projector and LoRA's initial weights: the same run gives the same model
    model, processor, assembled = load_model(model_args, data_args)
    processor.conversation_template = data_args.version  # every folder saved from here says how to prompt it
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    if training_args.lora_enable and assembled and int(os.environ.get("RANK", "0")) == 0 and resume is None:
        # The adapter needs a base it can be merged into later: the model as assembled here, before LoRA.
        with atomic_dir(Path(training_args.output_dir) / LORA_BASE_DIR) as folder:
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
    set_trainable(model, training_args)
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
        model.enable_input_require_grads()
    if training_args.lora_enable:
        model = apply_lora(model, training_args)
    budgets = drawn_budgets(model, data_args.budgets)
    dataset = LlavaJsonDataset(
        data_args.data_path,
        data_args.image_folder,
        processor.tokenizer,
        processor.image_processor,
        data_args.version,
        max(budgets.values()) if budgets else model.config.image_seq_length,  # the collator cuts down to a batch's
        training_args.model_max_length,
        skip_bad_records=data_args.skip_bad_records,
        image_token_id=model.config.image_token_id,
        images_only=trains_projector_alone(training_args),
    )
    if dataset.num_text_only and training_args.process_index == 0:
        logger.warning("only the projector trains: %d text-only records left out", dataset.num_text_only)
    if len(dataset) == 0:
        raise ValueError(f"{data_args.data_path}: no records to train on")
    trainer = VlmTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=DataCollatorForLlava(
            processor.tokenizer,
            image_token_id=model.config.image_token_id,
            budgets=budgets,
            seed=training_args.seed,
            budgets_per_step=data_args.budgets_per_step,
        ),
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    save_outputs(trainer, model, processor, model_args, training_args, assembled)
    if torch.distributed.is_initialized():
        # Shut the process group down before exit: left to interpreter teardown, a gloo rank once aborted with
        # "terminate called without an active exception" after a finished run (exit code -6).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """LLaVA's command line: `scripts/train_vlm.py ARGS` (`--help` lists them)."""
    run(*parse_args(argv))
    return 0


def _is_peft(model) -> bool:
    return type(model).__name__.startswith("Peft")
