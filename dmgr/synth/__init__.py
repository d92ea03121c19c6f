"""The synthesis job: Hydra app, config validation, seed plans, workers. Composes everything else."""
