"""all-MiniLM-L6-v2 as a Flax NNX model, with the data and the prune/serve/recover steps of
``examples/prune_minilm.py`` (an example, not part of the jaxsparse API)."""
