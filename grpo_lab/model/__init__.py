"""The policy: built from a config or a local HF directory (``policy``), a tokenizer made locally (char or
BPE, ``tokenizer``), real architectures saved as local HF directories (``build_model``), and the cached
supervised warm start (``warmstart``). Nothing here downloads from a hub."""
