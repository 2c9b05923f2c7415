"""Slim Hugging Face models on disk: ``modeling_hawada.py``, the file a non-uniform slim model's
``save_pretrained`` copies into its folder (loaded with ``trust_remote_code=True``), and
``folder.py``, what HawAda reads from such folders."""
