"""Tiny LLaVA models for tests: the test SparseFormer (15 latent tokens) + a 2-layer LLM built from a config."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mllm_sparse
from llava_adapter.modeling import build_vlm
from llava_adapter.processing import build_image_processor, build_processor
from llava_adapter.towers import image_token_table
from mllm_sparse.elastic import make_elastic

LLM_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def tiny_llm(tokenizer, family=LlamaForCausalLM, config=LlamaConfig):
    torch.manual_seed(0)
    return family(
        config(
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **LLM_SIZES,
        )
    )


def tiny_vlm(
    tokenizer,
    projector: str = "mlp2x_gelu",
    family=LlamaForCausalLM,
    config=LlamaConfig,
    budgets: list[int] | None = None,
):
    """(model in eval mode, its SparseLlavaProcessor); `budgets`: an elastic tower serving those latent-token counts
    (default: the largest)."""
    torch.manual_seed(0)
    encoder = mllm_sparse.create_model("test_sparseformer_btsp")
    if budgets:
        encoder = make_elastic(encoder, budgets)
    model = build_vlm(encoder, tiny_llm(tokenizer, family, config), tokenizer, projector).eval()
    enc = encoder.config
    image_processor = build_image_processor(enc.image_size, enc.image_mean, enc.image_std)
    table = image_token_table(model.config)
    return model, build_processor(tokenizer, image_processor, model.config.image_seq_length, table)


def save_tiny_vlm(tokenizer, folder: Path, budgets: list[int] | None = None) -> Path:
    model, processor = tiny_vlm(tokenizer, budgets=budgets)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def common_args(vlm_dir, data, image_folder, out, *extra) -> list[str]:
    """`scripts/train_vlm.py` arguments for 2 CPU steps of batch 2, no checkpoints."""
    return [
        "--model_name_or_path", str(vlm_dir), "--data_path", str(data), "--image_folder", str(image_folder),
        "--output_dir", str(out), "--per_device_train_batch_size", "2", "--max_steps", "2",
        "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--model_max_length", "128",
        "--dataloader_num_workers", "0", *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_launcher(port: int) -> list[str]:
    """`deepspeed` running `scripts/train_vlm.py` on 2 ranks (CPU ones with DS_ACCELERATOR=cpu), master on `port`."""
    deepspeed = Path(sys.executable).parent / "deepspeed"
    return [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), "scripts/train_vlm.py"]


def allreduce_buffers_left(port: int) -> list[str]:
    """What the DeepSpeed run whose master was on `port` left in /dev/shm: its CPU all-reduce buffers, unless
    train_vlm released them."""
    return sorted(path.name for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
