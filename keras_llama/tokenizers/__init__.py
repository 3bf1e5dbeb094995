"""Tokenizers backed by sentencepiece and Hugging Face tokenizers. (Placeholder.)"""
