"""dsgd: decentralized SGD for any nn.Module, and the instruments that measure what it does."""

__version__ = "0.1.0"
