"""`fastdecode train`: prompts -> the target's own answers -> stored features -> trained drafter heads.

    prompts.py   ShareGPT's opening turns (or your own file), Spec-Bench overlap dropped
    distill.py   the target answers them itself, batched through the scheduler
    features.py  a teacher-forced forward stores hidden states and top-k next-token distributions
    loop.py      AdamW over the stored features, checkpoints, held-out acceptance each epoch
    card.py      the head's safetensors file and its JSON card
    command.py   the command line and the run folder that makes every stage resumable
"""
