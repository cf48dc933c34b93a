"""ppow-plugin: PPOW reinforcement-learning stage for EAGLE drafters.

Importing the package pulls in nothing heavy (no torch.distributed, DeepSpeed or EAGLE).
"""

__version__ = "0.1.0"
