"""The client side, wherever a client runs (simulation pool, Ray worker, ClientApp):
:mod:`~metafed.client.reply` says what a client's outputs are made of."""
from metafed.client.reply import LOCAL_KEYS, upload_of

__all__ = ["LOCAL_KEYS", "upload_of"]
