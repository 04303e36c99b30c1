"""Training driver: arguments, data, distributed setup and the pretraining loop."""
