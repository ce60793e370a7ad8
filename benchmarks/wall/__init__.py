"""The scaling-wall grid (`python -m benchmarks.scaling_wall`), one module per job:

- `modes`: every training mode of the grid (Top-k, specialists, EMoE and its ablations, the M-MoE
  variants, the elastic-pretraining remedies) and its training flags;
- `runs`: the grid as runs (setting, mode, seed), their commands, result files and the job pool
  that runs them, skipping the finished ones;
- `sft_split`: the instruction data of setting (b) with an evaluation split of at least 64k
  response tokens;
- `stats`: seed statistics (mean, standard deviation, paired 95% intervals, effective range,
  training compute), pure functions of the per-run losses;
- `plots`: the figures.
"""
