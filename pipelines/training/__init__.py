"""Training on Ray Train, one module per job: `config` (the [train] and [margin] sections),
`step` (one rank's model and step), `checkpoint` (the checkpoint format), `data` (shards ->
batches), `loop` (what every worker runs), `tracking` (MLflow), `driver` (the TorchTrainer)."""
