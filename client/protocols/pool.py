"""The descriptor pool the standard protocols' messages live in.

Their proto packages (``inference``, ``tensorflow``, ``tensorflow.serving``) are the
protocols' own, so that the services, methods and ``Any`` type URLs are the ones their
clients expect. tritonclient, TensorFlow and tensorflow-serving-api register the same
names in protobuf's default pool, and a process holding one of them and costserve's
modules (the server imports TensorFlow; a test imports tritonclient) would fail with
"duplicate symbol". costserve's modules therefore build their classes here
(protos/generate.py points protoc's output at this pool).
"""

from __future__ import annotations

from google.protobuf import any_pb2, descriptor_pool, wrappers_pb2

#: Holds the protocols' files and the well-known types they import.
POOL = descriptor_pool.DescriptorPool()
for _well_known in (any_pb2, wrappers_pb2):
    POOL.AddSerializedFile(_well_known.DESCRIPTOR.serialized_pb)
