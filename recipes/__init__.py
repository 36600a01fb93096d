"""Training tasks (LightningModules and DataModules) used by the Hydra application and the tests."""
