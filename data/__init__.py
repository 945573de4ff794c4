"""Data pipeline: the tokenizer, record readers and the prepare/fetch scripts."""
