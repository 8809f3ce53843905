from importlib.metadata import PackageNotFoundError, version

try:
    KNEXA_VERSION = version("knexa-node")
except PackageNotFoundError:  # running from a source tree without an install
    KNEXA_VERSION = "0.0.0+local"

try:
    _LIBP2P_VERSION = version("libp2p")
except PackageNotFoundError:
    _LIBP2P_VERSION = "unknown"

AGENT_VERSION = f"knexa-node/{KNEXA_VERSION} py-libp2p/{_LIBP2P_VERSION}"
