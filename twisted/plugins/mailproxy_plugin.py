"""The twistd dropin: C{twistd -n mailproxy --config conf/mailproxy.toml}."""

from twisted.application.service import ServiceMaker

mailproxy = ServiceMaker(
    "mailproxy",
    "mailproxy.tap",
    "A before-queue SMTP filtering proxy in front of a real MTA.",
    "mailproxy",
)
