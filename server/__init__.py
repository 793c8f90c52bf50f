"""costserve.server: the gRPC inference service (runtimes, batcher, cache, core, servicers, CLI).

Importing this package does not import TensorFlow; the runtimes and the trainer
import it when they are used.
"""
