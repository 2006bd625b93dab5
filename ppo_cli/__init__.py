"""ppo-cli: Proximal Policy Optimization from Hydra config files."""

__version__ = "0.1.0"
