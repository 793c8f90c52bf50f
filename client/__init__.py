"""costserve: the Python client of the costserve inference service.

Example::

    from costserve import Client

    with Client("127.0.0.1:50051", tenant="acme") as client:
        response = client.predict(["examples/digits/digit_7.png"], precision="int8")
        print(response.predictions[0].label, response.cost.usd)
        for model in client.list_models().models:       # the server's models and their versions
            print(model.name, [version.version for version in model.versions])
        response = client.predict(["examples/digits/digit_7.png"], model="digits", top_k=3)
        print(response.predictions[0].classes)          # the 3 most probable classes, highest first

``Client(..., token=...)`` sends a bearer token (an API key or a JWT) with every call, to a
server that authenticates its callers; give it ``tls=TlsFiles(...)`` too, or the token
travels in plain text. :class:`AsyncClient` is the same on ``grpc.aio``. The server lives in
:mod:`costserve.server` (``pip install 'costserve[server]'``); this package imports
neither it nor TensorFlow.
"""

from importlib.metadata import PackageNotFoundError, version

from costserve.client import (
    AUTHORIZATION_METADATA_KEY,
    COST_METADATA_KEY,
    TENANT_METADATA_KEY,
    AsyncClient,
    Client,
    ImageLike,
    TlsFiles,
    cost_usd,
    image_message,
    predict_request,
    token_metadata,
    version_state_name,
)

__all__ = [
    "AsyncClient",
    "AUTHORIZATION_METADATA_KEY",
    "Client",
    "COST_METADATA_KEY",
    "ImageLike",
    "TENANT_METADATA_KEY",
    "TlsFiles",
    "cost_usd",
    "image_message",
    "predict_request",
    "token_metadata",
    "version_state_name",
]

try:
    __version__ = version("costserve")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
