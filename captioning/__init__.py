"""ResNet-50 + LSTM image captioning as a reproducible DVC pipeline.

Importing the package is cheap: nothing here imports TensorFlow, so parsing and splitting
stay fast. Modules that need TensorFlow (features, model, train, decode) import it themselves.
"""
