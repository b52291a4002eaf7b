"""tokensieve.trainers: TRL trainer subclasses, one per method family (registered in launch/methods.py)."""
