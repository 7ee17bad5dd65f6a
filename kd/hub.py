"""Fail fast when the Hugging Face hub is unreachable.

Without network, `from_pretrained` and `load_dataset` retry for ~25 s before failing. One quick
socket probe tells us the hub is unreachable; we then switch the libraries to offline mode, so a
model or dataset already in the local HF cache still loads and anything else fails at once.
"""
import functools
import os
import socket
from urllib.parse import urlparse

from kd.errors import KDError


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def prepare_hub_access() -> bool:
    """Probe the hub once; if unreachable, put huggingface_hub and datasets in offline mode."""
    reachable = hub_reachable()
    if not reachable:
        import huggingface_hub.constants as hub_constants
        hub_constants.HF_HUB_OFFLINE = True
        try:
            import datasets.config as datasets_config
            datasets_config.HF_HUB_OFFLINE = True
        except ImportError:
            pass
    return reachable


def hub_error(what: str, err: Exception, offline_hint: str) -> KDError:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return KDError(f"could not fetch {what} from the Hugging Face hub and it is not in the local "
                   f"cache ({first_line}). This machine may be offline. {offline_hint}")
