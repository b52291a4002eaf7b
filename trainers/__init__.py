from tokensieve.trainers import fused_head  # noqa: F401  (projects only labelled positions on CPU)
