"""The heterogeneous decoder: per-layer block configuration (`block_config`), its Hugging Face configuration
(`configuration_puzzle`) and model (`modeling_puzzle`). These three files ship inside every export, so they import
only each other, torch and transformers.
"""
