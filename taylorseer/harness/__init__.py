"""What every entry point shares: run folders and their identity, settings checks, loading weights and
prompts, timing and metrics files, distributed sessions, launch, Slurm, training helpers and writing
calibration files. Imports ``core`` only."""
