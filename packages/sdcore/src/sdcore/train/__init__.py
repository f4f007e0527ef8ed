"""The training runtime: one loop every method plugin trains through."""
