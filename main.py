"""bb3x-jax entry point: ``python main.py --config configs/cringe.py [--workdir DIR] [--mode MODE]``.

Modes:
  data   prepare the release (synthetic when config.data.manual_dir is empty),
         train the tokenizer, and run real batches through a sharded jitted step.
  train  train with config.train.objective (CRINGE by default) and evaluate on
         the valid split (work in progress: no checkpoints or resume yet).
"""

from absl import app, flags
from ml_collections import config_flags

from bb3x_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cringe.py", "Configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/cringe", "Where everything this run writes goes.")
_MODE = flags.DEFINE_enum("mode", "data", ["data", "train"], "What to run.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_lib.validate(_CONFIG.value)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # our own output says what happened
    if _MODE.value == "data":
        from bb3x_jax import data_check

        data_check.run(config, _WORKDIR.value)
    elif _MODE.value == "train":
        from bb3x_jax.train import loop

        loop.run(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
