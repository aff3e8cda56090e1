"""The embedded CPU testbed: tokenizer and tiny models built and cached by the project."""
