"""dist_cl: distributed contrastive learning with loss-aware mini-batch selection."""

__version__ = "0.1.0"
