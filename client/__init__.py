"""costserve: the Python client of the costserve inference service.

Example::

    from costserve import Client

    with Client("127.0.0.1:50051") as client:
        response = client.predict(["examples/digits/digit_7.png"], precision="int8")
        print(response.predictions[0].label, response.cost.usd)

The server lives in :mod:`costserve.server`; this package imports neither it nor
TensorFlow.
"""

from costserve.client import Client, ImageLike, image_message

__all__ = ["Client", "ImageLike", "image_message"]
__version__ = "0.1.0"
