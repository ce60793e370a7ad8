"""Fine-tuning a transformers MoE model with elastic routing through DeepSpeed (ZeRO-1/2/3, and
expert parallelism through DeepSpeed-MoE): `emoe-finetune-hf`, `examples/finetune_hf_emoe.py`.

`options` parses and checks every flag before anything is built, `sft_batches` turns the
project's SFT data into response-only-loss batches, `loop` trains, checkpoints and resumes.
"""
