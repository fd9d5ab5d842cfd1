"""LightningModules: parity MLP ensembles, chain-of-thought models, hidden-progress measures."""
