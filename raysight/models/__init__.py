"""Model wrappers: NNsight (any torch module); LanguageModel (Hugging Face) arrives with its issue."""
