"""Data loading: the corpora and datasets jobs train, evaluate and time on.

* :mod:`hawada.data.vision` - scikit-learn's digits and ImageFolder image classification;
* :mod:`hawada.data.text` - standard-library docstring passages for sentence encoders;
* :mod:`hawada.data.lm` - the standard library's source as a byte-level LM corpus;
* :mod:`hawada.data.files` - the user's own text (``.txt``/``.jsonl``/``.csv``/``.parquet`` files or
  a ``datasets`` folder), split by document, as passages or LM token windows.
"""
