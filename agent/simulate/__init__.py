"""Replay a labelled stream through the cascade (``understudy simulate``) and its data files."""
