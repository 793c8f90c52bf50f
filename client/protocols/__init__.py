"""Messages and stubs of the standard protocols costserve speaks besides costserve.v1.

- :mod:`costserve.protocols.inference_pb2` (and ``_grpc``): the Open Inference Protocol v2
  (``inference.GRPCInferenceService``).
- :mod:`costserve.protocols.tensorflow_serving_pb2` (and ``_grpc``): TensorFlow Serving's
  ``PredictionService`` and ``ModelService``, with TensorFlow's tensors in
  :mod:`costserve.protocols.tensorflow_pb2`.

Generated from protos/costserve/protocols by ``make proto``; their classes live in
:data:`costserve.protocols.pool.POOL`, apart from protobuf's default pool.
"""
