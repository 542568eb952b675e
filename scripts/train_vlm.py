"""Train a LLaVA-style model (stage 1 or 2); run under `deepspeed`, `torchrun` or plain python.

    deepspeed scripts/train_vlm.py --deepspeed scripts/zero2.json --model_name_or_path runs/vlm \
        --data_path runs/world/llava_train.json --image_folder runs/world --version plain \
        --tune_mm_mlp_adapter True --output_dir runs/stage1 ...

An --output_dir holding checkpoints resumes from the newest complete one, as LLaVA does (settings that would change
the result must match the recorded ones); `--overwrite_output_dir True` starts afresh instead.
All arguments: `python scripts/train_vlm.py --help` (see llava_adapter/train.py).
"""

import sys

from llava_adapter.train import main  # importing llava_adapter registers its towers and processor
from mllm_sparse_recipes.cli import configure_logging, is_user_error

if __name__ == "__main__":
    configure_logging()
    try:
        sys.exit(main())
    except Exception as err:
        if not is_user_error(err):
            raise
        # Bad input or a diverged run: one clear line per rank, no traceback.
        print(f"train_vlm: error: {err}", file=sys.stderr)
        sys.exit(2)
