"""Code written next to saved slim Hugging Face models (loaded with ``trust_remote_code=True``)."""
