"""Data loading: the corpora and datasets jobs train, evaluate and time on.

* :mod:`hawada.data.vision` - scikit-learn's digits and ImageFolder image classification;
* :mod:`hawada.data.text` - standard-library docstring passages for sentence encoders;
* :mod:`hawada.data.lm` - the standard library's source as a byte-level LM corpus.
"""
