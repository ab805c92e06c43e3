"""mailproxy: a before-queue SMTP filtering proxy built on Twisted."""

__version__ = "0.1.0"
