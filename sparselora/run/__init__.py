"""The pieces of a fine-tuning run, torchtune-recipe style; the recipe that puts them together in named phases
is `sparselora.train.finetune`.

    config.py     RunConfig, run-config YAML, absolute paths, the --resume merge
    folder.py     the output folder: checks, run_config.yaml (read here only), set aside / restore, checkpoints
    callbacks.py  StepTimer, SparsityGuard, Progress, TokenCounter
    trainer.py    the learning-rate schedule, the Trainer class and collator of a run's training path
"""
