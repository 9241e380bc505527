"""The Hugging Face boundary: parents in (`convert`: Llama-family checkpoints to puzzle's model) and children out
(`export`: a checkpoint with DeciLM / nemotron-nas `block_configs` that stock tools load).
"""
