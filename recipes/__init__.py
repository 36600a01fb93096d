"""Training tasks (LightningModules and DataModules) of the Hydra application, installed as
``lightning_decent.recipes``."""
