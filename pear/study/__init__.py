"""Controlled studies of the method on models trained here.

`pe`: the position-embedding study — three small causal LMs that differ only in their
position embedding (`archs`), trained on the same text and retrieval mix (`corpus`, `train`),
then `pear run` and base-vs-PEAR evaluation with the gold at several positions (`figures`).
"""
