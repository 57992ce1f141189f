"""The book's fine-tunes: each brings its data, its loss of a batch and its evaluation to train.py's loop."""
